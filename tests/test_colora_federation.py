"""CoLoRA over MQTT: shared A, B averaged; each device's r×r core stays and persists on it."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, Rejected
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from export.build import build_artifacts
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig, Update
from protocol.tensors import is_personal
from transport.broker import Broker
from tests.conftest import run_rounds
from transport.mqtt import MqttTransport

FED = "colora"


@pytest.fixture(scope="module")
def colora_artifacts() -> Path:
    return build_artifacts("fmnist-colora")


def _agent(broker: Broker, artifacts: Path, backend: str, data, state: Path) -> DeviceAgent:  # noqa: ANN001
    transport = MqttTransport(broker.host, broker.port, f"{backend}-{uuid.uuid4().hex[:4]}",
                              will=DeviceAgent.will(FED, backend))
    return DeviceAgent(backend, FED, make_trainer(backend, artifacts), data.x, data.y, transport,
                       state, seed=1)


def test_personal_cores_train_on_devices_and_never_travel(
    mosquitto: Broker, colora_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare
    manifest = load_manifest(colora_artifacts)
    personal_names = {s.name for s in manifest.tensors if is_personal(s.name)}
    assert personal_names == {"fc1.lora_S.weight", "fc2.lora_S.weight"}
    initial = load_file(str(colora_artifacts / manifest.files["adapter_init"]))
    np.testing.assert_array_equal(initial["fc1.lora_S.weight"], np.eye(4, dtype=np.float32))
    private, parts = device_partitions(2, alpha=0.3, seed=2)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=2, min_clients=2,
                              strategy="colora", train=TrainConfig(local_steps=6))
    coordinator = Coordinator(config, manifest, initial, agg, store)
    agents = [_agent(mosquitto, colora_artifacts, backend, private.subset(parts[i]),
                     tmp_path / "devices")
              for i, backend in enumerate(("executorch", "onnxruntime"))]

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: no personal tensor in any global; each device trained its own core and kept it
    assert [len(r.devices) for r in records] == [2, 2]
    assert not coordinator.rejections
    for round_number in store.history():
        assert not any(map(is_personal, store.global_at(round_number)))
    cores = {a.device_id: load_file(str(a.personal_path())) for a in agents}
    for device_cores in cores.values():
        assert set(device_cores) == personal_names
        assert np.abs(device_cores["fc1.lora_S.weight"] - np.eye(4)).max() > 1e-5
    assert np.abs(cores["executorch"]["fc1.lora_S.weight"]
                  - cores["onnxruntime"]["fc1.lora_S.weight"]).max() > 1e-6
    # A restarted device comes back with its own core, not the initial identity
    restarted = _agent(mosquitto, colora_artifacts, "onnxruntime", private.subset(parts[1]),
                       tmp_path / "devices")
    for name in personal_names:
        np.testing.assert_array_equal(restarted.personal[""][name], cores["onnxruntime"][name])

    # An upload that carries a personal core is refused: the core must never leave a device
    leaky = Update(FED, coordinator.round, "onnxruntime", manifest.sha256, 10, "leak",
                   dict(initial))
    with pytest.raises(Rejected, match="unexpected"):
        coordinator.validate(topics.update_topic(FED, "onnxruntime"),
                             codec.encode_update(leaky))
