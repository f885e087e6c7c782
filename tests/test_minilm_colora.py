"""minilm-colora: CoLoRA on MiniLM trains alike on every backend and starts as the frozen model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edge_client.trainer import Trainer, make_trainer
from export.build import build_artifacts
from protocol.manifest import BASE_DELTA, load_manifest
from protocol.tensors import TensorDict, is_personal, shared
from tests.test_minilm_parity import BATCH, LEARNING_RATE, LOSS_ATOL, STEP_ATOL
from tests.test_minilm_parity import batch  # noqa: F401 (a fixture: held-out quotes, mixed padding)
from workloads.lora import get_adapter, set_adapter
from workloads.minilm import LORA_RANK, MiniLmFortunes
from workloads.minilm_colora import MiniLmCoLora

BACKENDS = ("torch", "executorch", "onnxruntime")
LAYERS = 12  # 6 encoder layers x (query, value)
CORE_MOVE = 1e-5  # ~100 float32 steps of a core entry near 1: the cores really trained
CORE_STEP_RTOL = 1e-3


def initial_adapter(artifacts: Path) -> TensorDict:
    """The export's initial adapter (what the aggregator starts from)."""
    return load_file(str(artifacts / load_manifest(artifacts).files["adapter_init"]))


@pytest.fixture(scope="module")
def workload() -> MiniLmCoLora:
    return MiniLmCoLora()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    # Reused from .cache/ when the export inputs (code, weights, toolchain) are unchanged.
    return build_artifacts("minilm-colora", batch_size=BATCH)


@pytest.fixture(scope="module")
def trainers(artifacts: Path) -> dict[str, Trainer]:
    return {b: make_trainer(b, artifacts, learning_rate=LEARNING_RATE) for b in BACKENDS}


@pytest.fixture(scope="module")
def adapter(trainers: dict[str, Trainer]) -> TensorDict:
    """The initial adapter with B, the cores and the head perturbed.

    B = 0 would make every A and core gradient zero; cores away from I make a program that
    ignored S (or folded the initial I in as a constant) disagree with torch.
    """
    rng = np.random.default_rng(7)
    return {key: value if ".lora_A." in key
            else (value + rng.normal(0.0, 0.05, value.shape)).astype(np.float32)
            for key, value in trainers["torch"].get_adapter().items()}


def test_manifest_lists_cores_and_a_frozen_input_per_layer(artifacts: Path) -> None:
    """26 tensors as minilm-fortunes plus one identity r×r core per query/value layer."""
    manifest = load_manifest(artifacts)
    cores = {s.name: s.shape for s in manifest.tensors if is_personal(s.name)}
    assert len(manifest.tensors) == 26 + LAYERS and len(cores) == LAYERS
    assert cores["bert.encoder.layer.5.attention.self.value.lora_S.weight"] == (LORA_RANK,) * 2
    initial = initial_adapter(artifacts)
    for name in cores:
        np.testing.assert_array_equal(initial[name], np.eye(LORA_RANK), err_msg=name)
    # The ExecuTorch program takes a base delta for every CoLoRA layer, as minilm-fortunes'.
    deltas = {s.name for s in manifest.frozen_inputs if s.kind == BASE_DELTA}
    assert deltas == {name.removesuffix(".lora_S.weight") for name in cores}


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_training_matches_torch_and_moves_the_personal_cores(
    trainers: dict[str, Trainer], adapter: TensorDict, workload: MiniLmCoLora, backend: str,
    batch: tuple[np.ndarray, np.ndarray],  # noqa: F811
) -> None:
    # Prepare: the same adapter on both; two different batches
    other = tuple(t.numpy() for t in workload.example_batch(BATCH))
    for name in ("torch", backend):
        trainers[name].set_adapter(adapter)
        trainers[name].set_learning_rate(LEARNING_RATE)

    # Execute: two SGD steps on each
    losses = {name: [trainers[name].train_step(*b).loss for b in (batch, other)]
              for name in ("torch", backend)}
    after = {name: trainers[name].get_adapter() for name in ("torch", backend)}

    # Assert: same losses and adapters; the cores are in the adapter and trained
    np.testing.assert_allclose(losses[backend], losses["torch"], rtol=0, atol=LOSS_ATOL)
    assert set(after[backend]) == set(adapter)
    for key, ref in after["torch"].items():
        np.testing.assert_allclose(after[backend][key], ref, rtol=0, atol=STEP_ATOL, err_msg=key)
    cores = [k for k in adapter if is_personal(k)]
    assert len(cores) == LAYERS
    for key in cores:
        # A core moves by only 6e-5..6e-4 in two steps, too little for STEP_ATOL to mean much:
        # its step is compared relative to its size (measured: equal to 6e-5 of it, the float32
        # rounding of entries near 1).
        step, ref_step = after[backend][key] - adapter[key], after["torch"][key] - adapter[key]
        assert np.abs(ref_step).max() > CORE_MOVE, f"{key} barely trained"
        np.testing.assert_allclose(step, ref_step, rtol=0,
                                   atol=CORE_STEP_RTOL * np.abs(ref_step).max(), err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_adapter_leaves_the_personal_cores_alone(
    trainers: dict[str, Trainer], adapter: TensorDict, backend: str,
) -> None:
    """What a device uploads and receives has no cores; setting it keeps the device's own."""
    trainer = trainers[backend]
    trainer.set_adapter(adapter)
    upload = shared(trainer.get_adapter())
    assert upload and not any(is_personal(k) for k in upload)
    trainer.manifest.check_adapter(upload, shared_only=True)
    fresh = {k: np.zeros_like(v) for k, v in upload.items()}  # a "global" unlike the device's
    trainer.set_adapter(fresh)
    now = trainer.get_adapter()
    for key, value in now.items():
        np.testing.assert_array_equal(value, adapter[key] if is_personal(key) else fresh[key],
                                      err_msg=key)


def test_the_initial_model_is_the_frozen_encoder_and_head(
    workload: MiniLmCoLora, trainers: dict[str, Trainer],
    batch: tuple[np.ndarray, np.ndarray],  # noqa: F811
) -> None:
    # Prepare: both MiniLM workloads from one seed; minilm-fortunes without its adapter is the
    # frozen encoder + head
    base = workload.base_weights()
    colora = workload.build(base, seed=0)
    lora = MiniLmFortunes().build(base, seed=0)
    ids = torch.from_numpy(batch[0])

    # Execute
    with torch.no_grad():
        got = colora(ids)
        with lora.disable_adapter():
            frozen = lora(ids)
        plain_lora = lora(ids)

    # Assert: B = 0 adds exact zeros, and the seed gives both workloads the same head
    torch.testing.assert_close(got, frozen, rtol=0, atol=0)
    torch.testing.assert_close(plain_lora, frozen, rtol=0, atol=0)
    np.testing.assert_array_equal(get_adapter(colora)["head.weight"],
                                  get_adapter(lora)["head.weight"])
    # The exported program starts there too.
    ort = trainers["onnxruntime"]
    ort.set_adapter(get_adapter(colora))
    np.testing.assert_allclose(ort.logits(batch[0]), frozen.numpy(), rtol=0, atol=1e-5)
    # With the core at I, CoLoRA is plain LoRA: the same A and a nonzero B give peft's logits,
    # which differ from the frozen model's (so the check above is not vacuous).
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (m for m in colora.modules() if hasattr(m, "lora_B")):
            layer.lora_B.weight.normal_(0.0, 0.05)
    set_adapter(lora, shared(get_adapter(colora)))
    with torch.no_grad():
        adapted = colora(ids)
        torch.testing.assert_close(adapted, lora(ids), rtol=0, atol=1e-5)
    assert (adapted - frozen).abs().max() > 1e-2
