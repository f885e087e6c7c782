"""Exact (FedEx-style) aggregation over MQTT: the global model is the exact mean of the clients'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, _split_residual
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from transport.broker import Broker
from tests.conftest import run_rounds
from transport.mqtt import MqttTransport
from workloads import fmnist

FED = "exact"
LAYERS = ("fc1", "fc2")


def _residual(factors: dict[str, np.ndarray], layer: str, shape: tuple[int, int]) -> np.ndarray:
    if f"{layer}.U" not in factors:
        return np.zeros(shape)
    return factors[f"{layer}.U"].astype(np.float64) @ factors[f"{layer}.V"].astype(np.float64)


def _lora(adapter: dict[str, np.ndarray], layer: str) -> np.ndarray:
    return (adapter[f"{layer}.lora_B.weight"].astype(np.float64)
            @ adapter[f"{layer}.lora_A.weight"].astype(np.float64))


def test_exact_federation_equals_the_mean_of_client_models(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: a torch and an ONNX Runtime device (ExecuTorch cannot change frozen weights)
    manifest = load_manifest(cnn_artifacts)
    scaling = manifest.lora["alpha"] / manifest.lora["r"]
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    private, parts = device_partitions(2, alpha=0.3, seed=5)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=2, min_clients=2,
                              strategy="exact", train=TrainConfig(local_steps=8))
    coordinator = Coordinator(config, manifest, initial, agg, store)
    agents = []
    for i, backend in enumerate(("torch", "onnxruntime")):
        data = private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, backend,
                                  will=DeviceAgent.will(FED, backend))
        agents.append(DeviceAgent(backend, FED, make_trainer(backend, cnn_artifacts), data.x,
                                  data.y, transport, seed=i))

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: after each round, W0 + R_cum + s·B̄Ā == Σ p_k (W0 + R_cum_before + s·B_k A_k)
    assert [len(r.devices) for r in records] == [2, 2]
    for round_number in (0, 1):
        updates = store.accepted_adapters(round_number)
        assert len(updates) == 2
        total = sum(w for _, w in updates)
        before_adapter, before = _split_residual(store.global_at(round_number))
        after_adapter, after = _split_residual(store.global_at(round_number + 1))
        for layer in LAYERS:
            shape = _lora(after_adapter, layer).shape
            got = _residual(after, layer, shape) + scaling * _lora(after_adapter, layer)
            want = _residual(before, layer, shape) + scaling * sum(
                w / total * _lora(a, layer) for a, w in updates)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{layer} round {round_number}")
            # FedAvg of the factors alone is not exact: the residual carries the difference
            assert np.abs(_residual(after, layer, shape) - _residual(before, layer, shape)).max() > 1e-7
    final_adapter, final_residual = _split_residual(store.global_at(2))
    assert {k.rsplit(".", 1)[0] for k in final_residual} == set(LAYERS)
    assert final_residual["fc1.U"].shape[0] == 128 and final_residual["fc1.V"].shape[1] == 1568

    # Devices: ONNX Runtime and torch apply the same residual and agree on the logits
    message = GlobalModel(FED, 2, manifest.sha256, final_adapter, base_residual=final_residual)
    x = fmnist.load("t10k").x[:32]  # the programs have a static batch of 32
    logits = []
    for backend in ("torch", "onnxruntime"):
        trainer = make_trainer(backend, cnn_artifacts)
        trainer.set_base_delta({layer: final_residual[f"{layer}.U"] @ final_residual[f"{layer}.V"]
                                for layer in LAYERS})
        trainer.set_adapter(message.adapter)
        logits.append(trainer.logits(x))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)
    plain = make_trainer("torch", cnn_artifacts)
    plain.set_adapter(message.adapter)
    assert np.abs(plain.logits(x) - logits[0]).max() > 1e-4, "the residual changed nothing"


def test_executorch_device_refuses_an_exact_federation(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    trainer = make_trainer("executorch", cnn_artifacts)
    with pytest.raises(NotImplementedError, match="torch or onnxruntime"):
        trainer.set_base_delta({"fc1": np.zeros((128, 1568), np.float32)})
    data = fmnist.load("t10k").subset(np.arange(64))
    agent = DeviceAgent("et", FED, trainer, data.x, data.y, transport=None)  # type: ignore[arg-type]
    residual = {"fc1.U": np.ones((128, 1), np.float32), "fc1.V": np.ones((1, 1568), np.float32)}
    assert agent.handle_global(GlobalModel(FED, 0, manifest.sha256, initial,
                                           base_residual=residual)) == []
