"""End to end: aggregator and emulated devices on three backends over a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, adapter_distance
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent, DeviceState, device_seed
from edge_client.data import device_partitions
from edge_client.trainer import evaluate_dataset, make_trainer
from export.build import ADAPTER_INIT_FILE
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from tests.conftest import retained_statuses, run_rounds
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads import fmnist

REPO = Path(__file__).resolve().parent.parent


def test_three_devices_complete_rounds_and_the_model_improves(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare
    federation, rounds = "e2e", 2
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    private, parts = device_partitions(3, alpha=0.5, seed=1)
    config = AggregatorConfig(federation=federation, rounds=rounds, clients_per_round=3,
                              min_clients=3, round_deadline_s=120,
                              train=TrainConfig(local_steps=15, learning_rate=0.05))
    agg_transport = MqttTransport(mosquitto.host, mosquitto.port, "aggregator",
                                  persistent_session=True)
    agg_transport.start()
    store = GlobalStore(tmp_path / "aggregator")
    globals_seen = []
    coordinator = Coordinator(config, manifest, initial, agg_transport, store,
                              on_round=lambda record, adapter: globals_seen.append(adapter))
    agents = []
    for i, backend in enumerate(("executorch", "onnxruntime", "torch")):
        device_id = f"dev-{backend}"
        data = private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, device_id,
                                  will=DeviceAgent.will(federation, device_id))
        agents.append(DeviceAgent(device_id, federation, make_trainer(backend, cnn_artifacts),
                                  data.x, data.y, transport, tmp_path / "devices",
                                  seed=device_seed(device_id)))

    # Execute
    records = run_rounds(coordinator, agents, agg_transport)

    # Assert: every round heard all three devices, and the global moved each round
    assert [r.round for r in records] == [0, 1]
    assert all(r.devices == ("dev-executorch", "dev-onnxruntime", "dev-torch") for r in records)
    assert all(r.samples == sum(len(p) for p in parts) for r in records)  # FedAvg weights: n_k
    assert not any(a.transport.connected for a in agents), "devices stop on the final message"
    assert [a.rounds_trained for a in agents] == [2, 2, 2]
    assert adapter_distance(initial, globals_seen[0]) > 1e-2
    assert adapter_distance(globals_seen[0], globals_seen[1]) > 1e-2
    assert store.history() == [0, 1, 2]
    for agent in agents:
        assert DeviceState.load(agent.state_path).last_round == 1
    assert coordinator.online == {"dev-executorch", "dev-onnxruntime", "dev-torch"}
    assert not coordinator.rejections
    # After the run, the retained presence of every device reads offline.
    statuses = retained_statuses(mosquitto, federation)
    assert statuses == {"dev-executorch": False, "dev-onnxruntime": False, "dev-torch": False}

    test = fmnist.load("t10k").subset(np.arange(500))
    scorer = make_trainer("onnxruntime", cnn_artifacts)
    _, acc_before = evaluate_dataset(scorer, test.x, test.y)
    scorer.set_adapter(globals_seen[-1])
    _, acc_after = evaluate_dataset(scorer, test.x, test.y)
    assert acc_after > acc_before + 0.3, (acc_before, acc_after)


def test_demo_command_with_embedded_broker(tmp_path: Path, cnn_artifacts: Path) -> None:
    # The README's demo, shortened, on the fallback broker for machines without Mosquitto.
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "demo", "--devices", "3", "--rounds", "2",
         "--local-steps", "10", "--backends", "onnxruntime,torch", "--broker", "amqtt",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "amqtt (embedded Python broker)" in proc.stdout
    assert "accuracy rose" in proc.stdout
    (results,) = out.glob("*/results.json")
    rows = json.loads(results.read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert all(r["bytes_up"] > 0 for r in rows[1:])
