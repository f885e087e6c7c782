"""The pretrained transformer federated for real: MiniLM devices on ExecuTorch and ONNX Runtime
train their Dirichlet shares of the fortunes over a real Mosquitto, and every update counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, adapter_distance
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent, device_seed
from edge_client.trainer import make_trainer
from export.build import build_artifacts
from protocol.codec import MAX_PAYLOAD_BYTES
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from protocol.residual import dense_residual
from tests.conftest import run_rounds
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads.registry import get_workload_data

FED = "minilm"
# Batch 4: the parity test's export (shared through the cache); a step takes ~0.1-1 s here.
BATCH = 4
BACKENDS = ("executorch", "onnxruntime", "executorch")


@pytest.fixture(scope="module")
def minilm_artifacts() -> Path:
    return build_artifacts("minilm-fortunes", batch_size=BATCH)


def _devices(broker: Broker, artifacts: Path, backends: tuple[str, ...], state_dir: Path,
             seed: int) -> list[DeviceAgent]:
    """One device per backend, each with its Dirichlet (alpha 0.5) share of the fortunes."""
    data = get_workload_data("minilm-fortunes")
    agents = []
    for i, backend in enumerate(backends):
        device_id = f"dev{i}-{backend}"
        share = data.device_data(i, len(backends), alpha=0.5, seed=seed)
        transport = MqttTransport(broker.host, broker.port, device_id,
                                  will=DeviceAgent.will(FED, device_id))
        agents.append(DeviceAgent(device_id, FED, make_trainer(backend, artifacts), share.x,
                                  share.y, transport, state_dir, seed=device_seed(device_id)))
    return agents


@pytest.mark.slow
def test_minilm_devices_on_two_runtimes_complete_rounds_with_no_rejection(
    mosquitto: Broker, minilm_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: 3 devices, Dirichlet shares of the 4 categories, 2 rounds of 2 local steps
    manifest = load_manifest(minilm_artifacts)
    initial = load_file(str(minilm_artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    globals_seen = []
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=len(BACKENDS),
                              min_clients=len(BACKENDS), round_deadline_s=240,
                              train=TrainConfig(local_steps=2, learning_rate=0.05))
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"),
                              on_round=lambda record, adapter: globals_seen.append(adapter))
    agents = _devices(mosquitto, minilm_artifacts, BACKENDS, tmp_path / "devices", seed=0)

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: every device's update was accepted in every round, and the global moved each round
    assert [r.round for r in records] == [0, 1]
    assert all(set(r.devices) == {a.device_id for a in agents} for r in records)
    assert not coordinator.rejections
    assert [a.rounds_trained for a in agents] == [2, 2, 2]
    assert adapter_distance(initial, globals_seen[0]) > 1e-4
    assert adapter_distance(globals_seen[0], globals_seen[1]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["exact", "fed-talora"])
def test_minilm_exact_and_fed_talora_run_30_rounds_within_the_payload_limit(
    mosquitto: Broker, minilm_artifacts: Path, tmp_path: Path, strategy: str
) -> None:
    # Prepare: an ExecuTorch and an ONNX Runtime device, 30 rounds of one local step each;
    # fed-talora moves from task {computers, politics} to {science, work} at round 15
    rounds = 30
    manifest = load_manifest(minilm_artifacts)
    initial = load_file(str(minilm_artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    schedule = {"task_schedule": ((0, 1), (2, 3)), "rounds_per_task": 15} \
        if strategy == "fed-talora" else {}
    config = AggregatorConfig(federation=FED, rounds=rounds, clients_per_round=2, min_clients=2,
                              round_deadline_s=240, strategy=strategy,
                              train=TrainConfig(local_steps=1, learning_rate=0.05), **schedule)
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"))
    agents = _devices(mosquitto, minilm_artifacts, ("executorch", "onnxruntime"),
                      tmp_path / "devices", seed=1)

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: every round took both devices' updates
    assert [r.round for r in records] == list(range(rounds))
    assert all(len(r.devices) == 2 for r in records)
    assert not coordinator.rejections
    # the global carries only each round's residual step: its size does not grow with the rounds
    # (12 query/value layers of 384 x 384), and stays far under the protocol's limit
    sizes = [r.global_bytes for r in records]
    assert max(sizes) < MAX_PAYLOAD_BYTES / 4, sizes
    assert max(sizes[10:]) <= 1.1 * max(sizes[1:10]), sizes
    # the residual is real, and each device's frozen weights hold exactly the gateway's R_t
    gateway = dense_residual(coordinator.state.residual)
    assert len(gateway) == 12 and sum(float(np.abs(r).sum()) for r in gateway.values()) > 0
    for agent in agents:
        assert agent.residual_round == rounds
        assert sorted(agent.residual) == sorted(gateway)
        for layer, matrix in gateway.items():
            np.testing.assert_allclose(agent.residual[layer], matrix, rtol=1e-4, atol=1e-6)
