"""MiniLM on fortunes: ExecuTorch and ONNX Runtime train exactly like the eager torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.trainer import Trainer, make_trainer
from export.build import build_artifacts
from protocol.tensors import TensorDict
from workloads import fortunes
from workloads.minilm import MiniLmFortunes

# Batch 4 keeps the ExecuTorch steps short: portable kernels take ~6 s per forward/backward here
# (2 cores) against ~13 s at the workload's batch of 16. Shapes do not change the maths.
BATCH = 4
LEARNING_RATE = 0.05
BACKENDS = ("torch", "executorch", "onnxruntime")
# Measured on 2 cores: loss differs by 1.2e-7 and gradients by at most 2.4e-7 absolute (relative
# 3e-6), adapters after one step by 1.5e-8, for both backends: the brief's tolerances hold as is.
LOSS_ATOL = 1e-4
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-5
STEP_ATOL = 1e-5


@pytest.fixture(scope="module")
def workload() -> MiniLmFortunes:
    return MiniLmFortunes()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    # Reused from .cache/ when the export inputs (code, weights, toolchain) are unchanged.
    return build_artifacts("minilm-fortunes", batch_size=BATCH)


@pytest.fixture(scope="module")
def batch(workload: MiniLmFortunes) -> tuple[np.ndarray, np.ndarray]:
    """One held-out fortune per class: not the export's example batch, so nothing traced from
    that batch (lengths, padding) can make the programs agree by accident."""
    texts, labels = fortunes.load_fortunes(workload.labels)
    _, test = fortunes.train_test_split(labels)
    index = np.array([test[labels[test] == c][1] for c in range(len(workload.labels))])
    ids = workload.tokenize([texts[i] for i in index])
    pad = workload.tokenizer.pad_token_id
    # Mixed padding is what the attention mask and the mean pooling are tested by.
    lengths = (ids != pad).sum(axis=1)
    assert lengths.min() < workload.seq_len and len(set(lengths.tolist())) > 1
    return ids, labels[index]


@pytest.fixture(scope="module")
def trainers(artifacts: Path) -> dict[str, Trainer]:
    return {b: make_trainer(b, artifacts, learning_rate=LEARNING_RATE) for b in BACKENDS}


@pytest.fixture(scope="module")
def adapter(trainers: dict[str, Trainer]) -> TensorDict:
    """The initial adapter with LoRA-B and the head perturbed.

    peft starts LoRA-B at zero, which makes every LoRA-A gradient zero; a nonzero B makes the
    A gradients (the longest backward path) part of the comparison too.
    """
    rng = np.random.default_rng(7)
    initial = trainers["torch"].get_adapter()
    return {
        key: value if ".lora_A." in key
        else (value + rng.normal(0.0, 0.05, value.shape)).astype(np.float32)
        for key, value in initial.items()
    }


@pytest.fixture(scope="module")
def gradients(
    trainers: dict[str, Trainer], adapter: TensorDict, batch: tuple[np.ndarray, np.ndarray]
) -> dict[str, tuple[float, TensorDict]]:
    """(loss, adapter gradients) of every backend on the same batch from the same adapter."""
    results = {}
    for backend, trainer in trainers.items():
        trainer.set_adapter(adapter)
        results[backend] = trainer.gradients(*batch)
    return results


def test_adapter_layout(trainers: dict[str, Trainer]) -> None:
    """LoRA r=8 on 6 layers x (query, value) plus the 384 -> 4 head: 26 tensors, 75,268 values."""
    manifest = trainers["torch"].manifest
    assert manifest.input_shape == (BATCH, MiniLmFortunes.seq_len)
    assert manifest.input_dtype == "int64"
    names = {spec.name for spec in manifest.tensors}
    assert {"head.weight", "head.bias",
            "bert.encoder.layer.0.attention.self.query.lora_A.weight"} <= names
    assert len(names) == 26
    assert sum(int(np.prod(spec.shape)) for spec in manifest.tensors) == 75_268


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_loss_and_gradients_match_torch(
    gradients: dict[str, tuple[float, TensorDict]], backend: str
) -> None:
    ref_loss, ref_grads = gradients["torch"]
    loss, grads = gradients[backend]
    assert loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    assert set(grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        np.testing.assert_allclose(grads[key], ref, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=key)


def test_gradients_are_not_vacuous(gradients: dict[str, tuple[float, TensorDict]]) -> None:
    """Parity of all-zero gradients would prove nothing: LoRA-A, LoRA-B and head must all move,
    and clearly above the comparison tolerance."""
    _, grads = gradients["torch"]
    for part in (".lora_A.", ".lora_B.", "head."):
        largest = max(np.abs(g).max() for k, g in grads.items() if part in k)
        assert largest > 100 * GRAD_ATOL, f"{part} gradients are ~0 ({largest})"


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_one_sgd_step_matches_torch(
    trainers: dict[str, Trainer], adapter: TensorDict, batch: tuple[np.ndarray, np.ndarray],
    backend: str,
) -> None:
    after = {}
    for name in ("torch", backend):
        trainers[name].set_adapter(adapter)
        trainers[name].set_learning_rate(LEARNING_RATE)
        trainers[name].train_step(*batch)
        after[name] = trainers[name].get_adapter()
    moved = max(np.abs(after["torch"][k] - adapter[k]).max() for k in adapter)
    assert moved > 100 * STEP_ATOL, "the step barely changed the adapter: the check is vacuous"
    for key, ref in after["torch"].items():
        np.testing.assert_allclose(after[backend][key], ref, rtol=0, atol=STEP_ATOL, err_msg=key)


def test_a_class_mask_gives_the_same_logits_and_step_on_every_backend(
    trainers: dict[str, Trainer], adapter: TensorDict, batch: tuple[np.ndarray, np.ndarray],
) -> None:
    """Class-incremental rounds (Fed-TaLoRA) mask the logits of the classes outside the task."""
    ids, labels = batch
    task = [0, 1]
    inside = np.isin(labels, task)
    assert inside.any() and not inside.all(), "the batch must hold classes on both sides"
    logits, after = {}, {}
    for name in ("torch", "onnxruntime", "executorch"):
        trainer = trainers[name]
        trainer.set_adapter(adapter)
        trainer.set_learning_rate(LEARNING_RATE)
        trainer.set_class_mask(task)
        try:
            logits[name] = trainer.logits(ids)
            trainer.train_step(ids[inside].repeat(2, axis=0)[: len(ids)],
                               labels[inside].repeat(2, axis=0)[: len(ids)])
            after[name] = trainer.get_adapter()
        finally:
            trainer.set_class_mask(None)
    # masked classes can never win, and every backend agrees on the logits and the step
    assert set(logits["torch"].argmax(-1)) <= set(task)
    for name in ("onnxruntime", "executorch"):
        kept = logits["torch"][:, task]
        np.testing.assert_allclose(logits[name][:, task], kept, atol=1e-4, err_msg=name)
        for key, ref in after["torch"].items():
            np.testing.assert_allclose(after[name][key], ref, rtol=0, atol=STEP_ATOL,
                                       err_msg=f"{name} {key}")


def test_padded_rows_stay_finite(
    workload: MiniLmFortunes, trainers: dict[str, Trainer], batch: tuple[np.ndarray, np.ndarray]
) -> None:
    """evaluate_dataset pads the last batch with all-pad rows; they must not turn into NaN.

    Only the fast backends: ExecuTorch runs the same graph (its warm-up already uses zeros).
    """
    ids, _ = batch
    padded = ids.copy()
    padded[-1] = workload.tokenizer.pad_token_id  # an all-[PAD] row: its mask sums to zero
    for name in ("torch", "onnxruntime"):
        logits = trainers[name].logits(padded)
        assert np.isfinite(logits).all(), name
        np.testing.assert_allclose(logits[:-1], trainers[name].logits(ids)[:-1], atol=1e-5)


def test_a_base_delta_on_every_lora_layer_matches_torch(
    artifacts: Path, adapter: TensorDict, batch: tuple[np.ndarray, np.ndarray],
    gradients: dict[str, tuple[float, TensorDict]],
) -> None:
    """Exact aggregation's residual on all 12 query/value layers: ExecuTorch passes it as program
    inputs, ONNX Runtime and torch write it into the frozen weights; all three agree."""
    from protocol.manifest import BASE_DELTA, LOGIT_BIAS, load_manifest

    every = load_manifest(artifacts).frozen_inputs
    assert sorted(s.kind for s in every) == [BASE_DELTA] * 12 + [LOGIT_BIAS]
    specs = [s for s in every if s.kind == BASE_DELTA]
    rng = np.random.default_rng(9)
    deltas = {s.name: rng.normal(0.0, 0.02, s.shape).astype(np.float32) for s in specs}
    results = {}
    for backend in BACKENDS:
        trainer = make_trainer(backend, artifacts)
        trainer.set_adapter(adapter)
        trainer.set_base_delta(deltas)
        results[backend] = trainer.gradients(*batch)  # type: ignore[attr-defined]
    ref_loss, ref_grads = results["torch"]
    assert abs(ref_loss - gradients["torch"][0]) > 1e-3  # the delta changed the model
    for backend in ("executorch", "onnxruntime"):
        loss, grads = results[backend]
        assert loss == pytest.approx(ref_loss, abs=LOSS_ATOL), backend
        for key, ref in ref_grads.items():
            np.testing.assert_allclose(grads[key], ref, rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                       err_msg=f"{backend} {key}")
