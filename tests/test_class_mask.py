"""Class masks (class-incremental learning): a frozen logit bias set on every backend.

torch and ONNX Runtime overwrite the frozen parameter; ExecuTorch passes it as a program input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.trainer import (
    MASK_LOGIT,
    Trainer,
    class_mask_bias,
    find_logit_bias,
    logit_bias_name,
    make_trainer,
)
from workloads import fmnist

# Same bounds as test_backend_parity: float32 sums in different orders across runtimes.
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
MASK_BACKENDS = ("torch", "onnxruntime", "executorch")
DEVICE_BACKENDS = ("onnxruntime", "executorch")
TASK = (0, 1, 2, 3, 4)  # the current task's classes; 5..9 are masked
BATCH = 32  # static in the exported programs


@pytest.fixture(scope="module")
def test_set() -> fmnist.Dataset:
    return fmnist.load("t10k")


@pytest.fixture(scope="module")
def task_batch(test_set: fmnist.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """One batch whose labels all belong to TASK (as a device's data in that task would)."""
    index = np.flatnonzero(np.isin(test_set.y, TASK))[:BATCH]
    return test_set.x[index], test_set.y[index]


def masked_gradients(backend: str, artifacts: Path, batch: tuple[np.ndarray, np.ndarray],
                     classes: tuple[int, ...] | None) -> tuple[float, dict[str, np.ndarray]]:
    trainer = make_trainer(backend, artifacts)
    trainer.set_class_mask(classes)
    return trainer.gradients(*batch)  # type: ignore[attr-defined]


def predictions(trainer: Trainer, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([trainer.logits(inputs[i : i + BATCH]).argmax(-1)
                           for i in range(0, len(inputs), BATCH)])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_device_backends_agree_with_torch_under_a_mask(backend: str, cnn_artifacts: Path,
                                                       task_batch) -> None:
    ref_loss, ref_grads = masked_gradients("torch", cnn_artifacts, task_batch, TASK)
    loss, grads = masked_gradients(backend, cnn_artifacts, task_batch, TASK)
    assert loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        np.testing.assert_allclose(grads[name], grad, atol=GRAD_ATOL, err_msg=name)
    # and the masked logits themselves (MASK_LOGIT + a score: exact to float32 rounding)
    logits = {}
    for name in ("torch", backend):
        trainer = make_trainer(name, cnn_artifacts)
        trainer.set_class_mask(TASK)
        logits[name] = trainer.logits(task_batch[0])
    np.testing.assert_allclose(logits[backend], logits["torch"], rtol=1e-6, atol=GRAD_ATOL)
    assert np.all(logits[backend][:, len(TASK):] < MASK_LOGIT / 2)


@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_masked_classes_get_no_gradient(backend: str, cnn_artifacts: Path, task_batch) -> None:
    masked = [c for c in range(len(fmnist.LABELS)) if c not in TASK]
    _, with_mask = masked_gradients(backend, cnn_artifacts, task_batch, TASK)
    _, without = masked_gradients(backend, cnn_artifacts, task_batch, None)
    for name in ("head.weight", "head.bias"):
        assert np.all(with_mask[name][masked] == 0.0), name  # exp underflows to exactly 0
        rows = np.abs(without[name][masked]).reshape(len(masked), -1)
        assert np.all(rows.max(axis=1) > 1e-6), name
        assert np.abs(with_mask[name][list(TASK)]).max() > 1e-4, name  # the task still learns


@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_mask_restricts_predictions_until_cleared(backend: str, cnn_artifacts: Path,
                                                  test_set: fmnist.Dataset) -> None:
    trainer = make_trainer(backend, cnn_artifacts)
    inputs = test_set.x[: 8 * BATCH]
    before = predictions(trainer, inputs)
    assert not np.all(np.isin(before, (2, 3)))  # otherwise the mask below would prove nothing
    trainer.set_class_mask([2, 3])
    assert np.all(np.isin(predictions(trainer, inputs), (2, 3)))
    trainer.set_class_mask(None)
    np.testing.assert_array_equal(predictions(trainer, inputs), before)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_mask_also_applies_in_train_step(backend: str, cnn_artifacts: Path, task_batch) -> None:
    trainer = make_trainer(backend, cnn_artifacts)
    x, y = task_batch
    trainer.set_class_mask([int(y[0])])
    # Every prediction is the one kept class, so exactly the examples of that class are correct.
    assert trainer.train_step(x, y).correct == int((y == y[0]).sum())


def test_executorch_program_without_frozen_inputs_refuses_a_mask(
    legacy_cnn_artifacts: Path,
) -> None:
    trainer = make_trainer("executorch", legacy_cnn_artifacts)
    with pytest.raises(NotImplementedError, match="no logit-bias input"):
        trainer.set_class_mask(TASK)


@pytest.mark.parametrize("backend", MASK_BACKENDS)
@pytest.mark.parametrize("classes", [[10], [-1], [0, 99], []])
def test_bad_class_ids_are_rejected(backend: str, classes: list[int], cnn_artifacts: Path,
                                    test_set: fmnist.Dataset) -> None:
    trainer = make_trainer(backend, cnn_artifacts)
    trainer.set_class_mask([2, 3])
    with pytest.raises(ValueError):
        trainer.set_class_mask(classes)
    # A rejected mask leaves the previous one in place.
    assert np.all(np.isin(predictions(trainer, test_set.x[:BATCH]), (2, 3)))


def test_class_mask_bias() -> None:
    bias = class_mask_bias([1, 3], 5)
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, [MASK_LOGIT, 0, MASK_LOGIT, 0, MASK_LOGIT])
    np.testing.assert_array_equal(class_mask_bias(None, 3), np.zeros(3, dtype=np.float32))
    # -1e4 rather than -inf: a fully masked softmax row stays finite
    logits = torch.from_numpy(class_mask_bias([0], 3)) - 1e4
    assert torch.isfinite(torch.log_softmax(logits, -1)).all()


@pytest.mark.parametrize("workload", ["fmnist-cnn", "fmnist-fedsq", "fmnist-colora"])
def test_every_cnn_workload_adds_the_bias_to_its_logits(workload: str) -> None:
    from workloads.registry import get_workload

    spec = get_workload(workload)
    model = spec.build(spec.base_weights(), seed=0)
    params = dict(model.named_parameters())
    name = find_logit_bias(params)
    assert name is not None and not params[name].requires_grad
    if workload != "fmnist-colora":  # CoLoRA's model is not wrapped by peft
        assert name == logit_bias_name()
    x, _ = spec.example_batch(4)
    with torch.no_grad():
        params[name].copy_(torch.from_numpy(class_mask_bias([7], len(spec.labels))))
        assert (model(x).argmax(-1) == 7).all()
