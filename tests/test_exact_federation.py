"""Exact (FedEx-style) aggregation over MQTT: the global model is the exact mean of the clients'.

Every backend applies the residual to its frozen weights: torch and ONNX Runtime in place,
ExecuTorch through its program's frozen inputs (W0 + delta per LoRA layer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.rounds import GlobalState
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from protocol.manifest import BASE_DELTA, Manifest, load_manifest
from protocol.messages import GlobalModel, TrainConfig
from protocol.residual import dense_residual
from tests.conftest import run_rounds, wait_for_round
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads import fmnist

FED = "exact"
LAYERS = ("fc1", "fc2")
BACKENDS = ("torch", "onnxruntime", "executorch")
# Same bounds as test_backend_parity: float32 sums in different orders across runtimes.
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
LOGIT_ATOL = 1e-5
BATCH = 32  # static in the exported programs
TASK = (0, 1, 2, 3, 4)


def _residual(tensors: dict[str, np.ndarray], layer: str, shape: tuple[int, int]) -> np.ndarray:
    """One layer of a wire-form residual as a float64 matrix (zeros where it has none)."""
    return dense_residual(tensors).get(layer, np.zeros(shape)).astype(np.float64)


def _stored(store: GlobalStore, round_number: int) -> GlobalState:
    return GlobalState.from_tensors(round_number, store.global_at(round_number), {})


def _lora(adapter: dict[str, np.ndarray], layer: str) -> np.ndarray:
    return (adapter[f"{layer}.lora_B.weight"].astype(np.float64)
            @ adapter[f"{layer}.lora_A.weight"].astype(np.float64))


def test_exact_federation_equals_the_mean_of_client_models(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: one device per backend; each applies the residual to its own frozen weights
    manifest = load_manifest(cnn_artifacts)
    scaling = manifest.lora["alpha"] / manifest.lora["r"]
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    private, parts = device_partitions(len(BACKENDS), alpha=0.3, seed=5)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=len(BACKENDS),
                              min_clients=len(BACKENDS), strategy="exact",
                              train=TrainConfig(local_steps=8))
    coordinator = Coordinator(config, manifest, initial, agg, store)
    agents = []
    for i, backend in enumerate(BACKENDS):
        data = private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, backend,
                                  will=DeviceAgent.will(FED, backend))
        agents.append(DeviceAgent(backend, FED, make_trainer(backend, cnn_artifacts), data.x,
                                  data.y, transport, seed=i))

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: after each round, W0 + R_cum + s·B̄Ā == Σ p_k (W0 + R_cum_before + s·B_k A_k)
    assert [len(r.devices) for r in records] == [len(BACKENDS)] * 2
    for round_number in (0, 1):
        updates = store.accepted_adapters(round_number)
        assert len(updates) == len(BACKENDS)
        total = sum(w for _, w in updates)
        before, after = _stored(store, round_number).residual, _stored(store, round_number + 1).residual
        after_adapter = _stored(store, round_number + 1).adapter
        for layer in LAYERS:
            shape = _lora(after_adapter, layer).shape
            got = _residual(after, layer, shape) + scaling * _lora(after_adapter, layer)
            want = _residual(before, layer, shape) + scaling * sum(
                w / total * _lora(a, layer) for a, w in updates)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{layer} round {round_number}")
            # FedAvg of the factors alone is not exact: the residual carries the difference
            assert np.abs(_residual(after, layer, shape) - _residual(before, layer, shape)).max() > 1e-7
    final_adapter, final_residual = _stored(store, 2).adapter, _stored(store, 2).residual
    assert set(dense_residual(final_residual)) == set(LAYERS)
    assert dense_residual(final_residual)["fc1"].shape == (128, 1568)
    # Each device added the small per-round steps itself, the final global's too, and holds
    # exactly the server's final R_2; none needed the cumulative catch-up.
    for agent in agents:
        assert agent.residual_round == 2
        for layer in LAYERS:
            np.testing.assert_allclose(agent.residual[layer],
                                       _residual(final_residual, layer, (1, 1)),
                                       atol=1e-6, err_msg=f"{agent.device_id} {layer}")

    # Devices: every backend applies the same residual and they agree on the logits
    message = GlobalModel(FED, 2, manifest.sha256, final_adapter)
    x = fmnist.load("t10k").x[:BATCH]
    logits = []
    for backend in BACKENDS:
        trainer = make_trainer(backend, cnn_artifacts)
        trainer.set_base_delta(dense_residual(final_residual))
        trainer.set_adapter(message.adapter)
        logits.append(trainer.logits(x))
    for backend, got in zip(BACKENDS[1:], logits[1:]):
        np.testing.assert_allclose(got, logits[0], atol=1e-4, err_msg=backend)
    plain = make_trainer("torch", cnn_artifacts)
    plain.set_adapter(message.adapter)
    assert np.abs(plain.logits(x) - logits[0]).max() > 1e-4, "the residual changed nothing"


def _perturbed_adapter(artifacts: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The initial adapter with B and the head moved: with B = 0 every lora_A gradient is 0."""
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(11)
    return {k: v if ".lora_A." in k else (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32)
            for k, v in initial.items()}


def _random_deltas(manifest: Manifest, seed: int) -> dict[str, np.ndarray]:
    """A random delta for every LoRA layer, of the size of a real residual (W0 ~ 0.03)."""
    rng = np.random.default_rng(seed)
    return {spec.name: rng.normal(0.0, 0.02, spec.shape).astype(np.float32)
            for spec in manifest.frozen_inputs if spec.kind == BASE_DELTA}


def _task_batch() -> tuple[np.ndarray, np.ndarray]:
    test = fmnist.load("t10k")
    index = np.flatnonzero(np.isin(test.y, TASK))[:BATCH]
    return test.x[index], test.y[index]


@pytest.mark.parametrize("classes", [None, TASK], ids=["no-mask", "mask"])
def test_executorch_with_a_base_delta_matches_torch(cnn_artifacts: Path,
                                                    classes: tuple[int, ...] | None) -> None:
    manifest = load_manifest(cnn_artifacts)
    assert {s.name for s in manifest.frozen_inputs if s.kind == BASE_DELTA} == set(LAYERS)
    adapter = _perturbed_adapter(cnn_artifacts, manifest)
    deltas = _random_deltas(manifest, seed=3)
    x, y = _task_batch()
    results = {}
    for backend in ("torch", "executorch"):
        trainer = make_trainer(backend, cnn_artifacts)
        trainer.set_adapter(adapter)
        trainer.set_class_mask(classes)
        trainer.set_base_delta(deltas)
        loss_and_grads = trainer.gradients(x, y)  # type: ignore[attr-defined]
        results[backend] = (trainer.logits(x), *loss_and_grads)
    ref_logits, ref_loss, ref_grads = results["torch"]
    logits, loss, grads = results["executorch"]
    np.testing.assert_allclose(logits, ref_logits, atol=LOGIT_ATOL)
    assert loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        np.testing.assert_allclose(grads[name], grad, atol=GRAD_ATOL, err_msg=name)
        assert np.abs(grad).max() > 1e-4, name  # every tensor, lora_A included, is tested
    # The delta is really applied: the same ExecuTorch program without it computes other logits
    plain = make_trainer("executorch", cnn_artifacts)
    plain.set_adapter(adapter)
    plain.set_class_mask(classes)
    assert np.abs(plain.logits(x) - logits).max() > 1e-2


def test_executorch_base_delta_replaces_the_previous_one(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    trainer = make_trainer("executorch", cnn_artifacts)
    trainer.set_adapter(_perturbed_adapter(cnn_artifacts, manifest))
    x, _ = _task_batch()
    original = trainer.logits(x)
    deltas = _random_deltas(manifest, seed=4)
    trainer.set_base_delta(deltas)
    with_delta = trainer.logits(x)
    assert np.abs(with_delta - original).max() > 1e-2
    trainer.set_base_delta({"fc1": deltas["fc1"]})  # set again: replaced, not added twice
    np.testing.assert_array_equal(trainer.logits(x), with_delta)
    trainer.set_base_delta({"fc1": np.zeros_like(deltas["fc1"])})  # fc2 keeps its delta
    only_fc2 = trainer.logits(x)
    assert np.abs(only_fc2 - original).max() > 1e-3 and np.abs(only_fc2 - with_delta).max() > 1e-3
    # A bad call changes nothing: unknown layer, wrong shape
    with pytest.raises(KeyError, match="conv1"):
        trainer.set_base_delta({"fc2": np.zeros_like(deltas["fc2"]), "conv1": np.zeros((16, 9))})
    with pytest.raises(ValueError, match="shape"):
        trainer.set_base_delta({"fc2": np.zeros_like(deltas["fc2"]), "fc1": np.zeros((128, 1))})
    np.testing.assert_array_equal(trainer.logits(x), only_fc2)
    trainer.set_base_delta({layer: np.zeros(d.shape) for layer, d in deltas.items()})
    np.testing.assert_array_equal(trainer.logits(x), original)


def test_executorch_program_without_frozen_inputs_refuses_an_exact_federation(
    legacy_cnn_artifacts: Path,
) -> None:
    manifest = load_manifest(legacy_cnn_artifacts)
    initial = load_file(str(legacy_cnn_artifacts / manifest.files["adapter_init"]))
    trainer = make_trainer("executorch", legacy_cnn_artifacts)
    with pytest.raises(NotImplementedError, match="re-export"):
        trainer.set_base_delta({"fc1": np.zeros((128, 1568), np.float32)})
    data = fmnist.load("t10k").subset(np.arange(64))
    agent = DeviceAgent("et", FED, trainer, data.x, data.y, transport=None)  # type: ignore[arg-type]
    residual = {"fc1.U": np.ones((128, 1), np.float32), "fc1.V": np.ones((1, 1568), np.float32)}
    assert agent.handle_global(GlobalModel(FED, 1, manifest.sha256, initial, residual=True,
                                           residual_step=residual)) == []
    # The same program still trains without a residual: legacy exports keep working
    [update] = agent.handle_global(GlobalModel(FED, 2, manifest.sha256, initial))
    assert update.num_samples == 64


def test_a_device_that_joins_late_catches_up_from_the_residual_topic(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: rounds 0 and 1 with two devices, then a third device joins in round 2
    import threading

    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    private, parts = device_partitions(3, alpha=0.3, seed=7)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-late", manual_ack=True,
                        persistent_session=True)
    agg.start()
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=3, min_clients=2,
                              round_deadline_s=4, strategy="exact",
                              train=TrainConfig(local_steps=4))
    coordinator = Coordinator(config, manifest, initial, agg, store)

    def agent(i: int, backend: str) -> DeviceAgent:
        data = private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, f"late-{i}",
                                  will=DeviceAgent.will(FED, f"d{i}"))
        return DeviceAgent(f"d{i}", FED, make_trainer(backend, cnn_artifacts), data.x, data.y,
                           transport, tmp_path / "devices", seed=i)

    early = [agent(0, "torch"), agent(1, "onnxruntime")]
    late = agent(2, "executorch")
    threads = [threading.Thread(target=a.run, daemon=True) for a in early]
    for thread in threads:
        thread.start()
    runner = threading.Thread(target=coordinator.run, daemon=True)
    runner.start()
    assert wait_for_round(coordinator, 2, 120) == 2
    late_thread = threading.Thread(target=late.run, daemon=True)
    late_thread.start()

    # Execute
    runner.join(120)
    for thread in (*threads, late_thread):
        thread.join(30)
    agg.stop()

    # Assert: the late device fetched R_2 (it was at R_0), its update counted in round 2, and
    # it added the final global's step on top: it ends holding the final R_3
    assert not runner.is_alive()
    assert store.accepted_count(2) == 3
    assert late.residual_round == 3 and not late._subscribed_residual
    r3 = _stored(store, 3).residual
    for layer in LAYERS:
        np.testing.assert_allclose(late.residual[layer], _residual(r3, layer, (1, 1)), atol=1e-6)
