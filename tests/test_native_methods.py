"""The native device under each method's device-side rules: exact residuals, CoLoRA's personal
cores, FL-TAC's task slots and Fed-TaLoRA's class masks, in real federations over Mosquitto."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import LocalTask, device_partitions
from edge_client.native import write_partition
from edge_client.trainer import make_trainer
from export.build import build_artifacts
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from protocol.residual import dense_residual
from protocol.tensors import is_personal
from tests.conftest import run_rounds, wait_for_round
from tests.test_native_federation import native_device
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent
FED = "native-methods"


def _python_agent(broker: Broker, artifacts: Path, device_id: str, data, state: Path,
                  backend: str = "onnxruntime") -> DeviceAgent:
    transport = MqttTransport(broker.host, broker.port, device_id,
                              will=DeviceAgent.will(FED, device_id))
    return DeviceAgent(device_id, FED, make_trainer(backend, artifacts), data.x, data.y,
                       transport, state, seed=1)


def _coordinator(broker: Broker, artifacts: Path, state: Path,
                 **config: object) -> tuple[Coordinator, MqttTransport]:
    manifest = load_manifest(artifacts)
    agg = MqttTransport(broker.host, broker.port, "agg", manual_ack=True, persistent_session=True)
    agg.start()
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    return Coordinator(AggregatorConfig(federation=FED, **config), manifest, initial, agg,
                       GlobalStore(state)), agg


def _stored_residual(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    with safe_open(str(path), "np") as stored:
        round_number = int((stored.metadata() or {})["round"])
    return round_number, load_file(str(path))


def test_native_devices_hold_the_exact_residual_and_a_late_one_catches_up(
    native_build: Path, mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path,
) -> None:
    # Prepare: an exact federation of a Python device and a native one; a second native device
    # joins in round 2, at R_0, and must fetch R_2 from the residual topic
    private, parts = device_partitions(3, alpha=0.3, seed=7)
    coordinator, agg = _coordinator(mosquitto, cnn_artifacts, tmp_path / "agg", rounds=3,
                                    clients_per_round=3, min_clients=2, round_deadline_s=4,
                                    strategy="exact", train=TrainConfig(local_steps=4))
    python = _python_agent(mosquitto, cnn_artifacts, "d0", private.subset(parts[0]),
                           tmp_path / "py")
    partitions = [write_partition(tmp_path / f"d{i}.safetensors", [LocalTask(
        "", private.subset(parts[i]).x, private.subset(parts[i]).y)]) for i in (1, 2)]
    state = tmp_path / "native"
    early = native_device("d1", FED, cnn_artifacts, partitions[0], mosquitto.port, state)
    thread = threading.Thread(target=python.run, daemon=True)
    thread.start()
    runner = threading.Thread(target=coordinator.run, daemon=True)
    runner.start()
    assert wait_for_round(coordinator, 2, 120) == 2

    # Execute
    late = native_device("d2", FED, cnn_artifacts, partitions[1], mosquitto.port, state)
    runner.join(120)
    thread.join(30)
    outputs = [p.communicate(timeout=30)[0] for p in (early, late)]
    agg.stop()

    # Assert: every round took the native updates; both native devices end holding the final
    # R_3 in their frozen weights (the late one through the catch-up, then the final step)
    assert not runner.is_alive() and [p.returncode for p in (early, late)] == [0, 0], outputs
    assert coordinator.store.accepted_count(2) == 3
    assert not coordinator.rejections, coordinator.rejections
    assert "fetching round 2's" in outputs[1], outputs[1]
    final = dense_residual(coordinator.state.residual)
    for device_id in ("d1", "d2"):
        round_number, held = _stored_residual(state / f"{device_id}.residual.safetensors")
        assert round_number == 3, device_id
        assert set(held) == set(final)
        for layer, value in final.items():
            np.testing.assert_allclose(held[layer], value, atol=1e-5, err_msg=device_id)


def test_native_colora_device_keeps_its_personal_core(
    native_build: Path, mosquitto: Broker, tmp_path: Path,
) -> None:
    # Prepare: CoLoRA on the CNN: a Python device and a native one
    artifacts = build_artifacts("fmnist-colora")
    private, parts = device_partitions(2, alpha=0.5, seed=3)
    coordinator, agg = _coordinator(mosquitto, artifacts, tmp_path / "agg", rounds=2,
                                    clients_per_round=2, min_clients=2, strategy="colora",
                                    train=TrainConfig(local_steps=5))
    python = _python_agent(mosquitto, artifacts, "py", private.subset(parts[0]), tmp_path / "py")
    data = private.subset(parts[1])
    partition = write_partition(tmp_path / "n.safetensors", [LocalTask("", data.x, data.y)])
    state = tmp_path / "native"
    native = native_device("nat", FED, artifacts, partition, mosquitto.port, state)

    # Execute
    records = run_rounds(coordinator, [python], agg)
    output = native.communicate(timeout=30)[0]

    # Assert: both rounds took both devices, nothing rejected (an upload carrying a personal
    # core would be); the native device's core trained and is kept on its disk
    assert [set(r.devices) for r in records] == [{"py", "nat"}] * 2, output
    assert not coordinator.rejections, coordinator.rejections
    cores = load_file(str(state / "nat.personal.safetensors"))
    initial = load_file(str(artifacts / load_manifest(artifacts).files["adapter_init"]))
    assert cores and all(is_personal(k) for k in cores)
    assert max(np.abs(cores[k] - initial[k]).max() for k in cores) > 1e-4


@pytest.mark.parametrize("strategy", ["fltac", "fed-talora"])
def test_native_devices_serve_task_slots_and_class_masks(
    native_build: Path, cnn_artifacts: Path, tmp_path: Path, strategy: str,
) -> None:
    # FL-TAC: each device holds two task slots (one update per slot); Fed-TaLoRA: a class
    # schedule whose other classes the devices mask. 4 devices, the last 2 native.
    extra = ["--rounds-per-task", "1"] if strategy == "fed-talora" else []
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--strategy", strategy, "--devices", "4",
         "--native", "2", "--rounds", "2", "--local-steps", "3", "--participation", "1.0",
         "--out", str(tmp_path), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    assert report["native_failures"] == 0 and not report["rejections"], report["rejections"]
    devices = results.parent / "devices"
    for device_id in ("dev-00002", "dev-00003"):
        log = (devices / f"{device_id}.log").read_text()
        assert "federation finished at round 2" in log and "cannot" not in log, log[-2000:]
        if strategy == "fltac":  # two slots: two updates a round, both counted
            assert "trained 2 rounds" in log, log[-2000:]
            assert len(re.findall(r"round \d+ update\(s\), loss [\d.]+, [\d.]+", log)) == 2
    if strategy == "fltac":  # every round counted the 8 task slots, the native ones' too
        assert [r["devices"] for r in report["rounds"][1:]] == [8, 8]


def test_native_minilm_device_federates_with_a_python_one(
    native_build: Path, tmp_path: Path,
) -> None:
    # The pretrained transformer on a native device: one round next to an ONNX Runtime device
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--workload", "minilm-fortunes", "--devices",
         "2", "--native", "1", "--rounds", "1", "--local-steps", "2", "--participation", "1.0",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    assert [r["devices"] for r in report["rounds"][1:]] == [2]
    assert report["native_failures"] == 0 and not report["rejections"]
    assert "trained 1 rounds" in (results.parent / "devices" / "dev-00001.log").read_text()
