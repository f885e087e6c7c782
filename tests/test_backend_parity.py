"""ExecuTorch and ONNX Runtime train the CNN adapter exactly as the torch reference does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.trainer import evaluate_dataset, make_trainer
from workloads import fmnist

# float32 sums in different orders across runtimes: the measured gap is ~5e-7 on gradients
# and ~5e-8 on parameters after a step; these bounds leave an order of magnitude of headroom.
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
PARAM_ATOL = 1e-6
DEVICE_BACKENDS = ("executorch", "onnxruntime")


@pytest.fixture(scope="module")
def batch(cnn_artifacts: Path) -> tuple[np.ndarray, np.ndarray]:
    test = fmnist.load("t10k")
    return test.x[:32], test.y[:32]


@pytest.fixture(scope="module")
def reference(cnn_artifacts: Path):  # noqa: ANN201
    return make_trainer("torch", cnn_artifacts)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_loss_and_gradients_match_reference(backend: str, cnn_artifacts: Path, batch,
                                            reference) -> None:
    trainer = make_trainer(backend, cnn_artifacts)
    ref_loss, ref_grads = reference.gradients(*batch)
    loss, grads = trainer.gradients(*batch)
    assert loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        np.testing.assert_allclose(grads[name], grad, atol=GRAD_ATOL, err_msg=name)
    # B is zero at init, so only B and the head get gradients; they must not be zero.
    assert np.abs(ref_grads["fc1.lora_B.weight"]).max() > 1e-4
    assert np.abs(ref_grads["head.weight"]).max() > 1e-4


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_sgd_steps_give_the_reference_adapter(backend: str, cnn_artifacts: Path) -> None:
    data = fmnist.load("t10k")
    trainer = make_trainer(backend, cnn_artifacts, learning_rate=0.05)
    ref = make_trainer("torch", cnn_artifacts, learning_rate=0.05)
    start = trainer.get_adapter()
    for step in range(3):
        x, y = data.x[32 * step : 32 * (step + 1)], data.y[32 * step : 32 * (step + 1)]
        got, want = trainer.train_step(x, y), ref.train_step(x, y)
        assert got.loss == pytest.approx(want.loss, abs=LOSS_ATOL)
        assert got.correct == want.correct
    after, ref_after = trainer.get_adapter(), ref.get_adapter()
    for name in ref_after:
        np.testing.assert_allclose(after[name], ref_after[name], atol=PARAM_ATOL, err_msg=name)
    assert any(np.abs(after[n] - start[n]).max() > 1e-3 for n in start), "adapter did not train"


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_set_adapter_is_what_the_program_uses(backend: str, cnn_artifacts: Path) -> None:
    data = fmnist.load("t10k")
    trainer = make_trainer(backend, cnn_artifacts)
    ref = make_trainer("torch", cnn_artifacts)
    rng = np.random.default_rng(3)
    adapter = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in ref.get_adapter().items()}
    trainer.set_adapter(adapter)
    ref.set_adapter(adapter)
    for name, array in trainer.get_adapter().items():
        np.testing.assert_array_equal(array, adapter[name])
    x, y = data.x[:100], data.y[:100]  # 100 is not a multiple of 32: exercises padding
    loss, acc = evaluate_dataset(trainer, x, y)
    ref_loss, ref_acc = evaluate_dataset(ref, x, y)
    assert loss == pytest.approx(ref_loss, abs=1e-4) and acc == ref_acc


def test_wrong_adapter_shape_is_refused(cnn_artifacts: Path) -> None:
    trainer = make_trainer("onnxruntime", cnn_artifacts)
    adapter = trainer.get_adapter()
    adapter["head.bias"] = np.zeros(11, np.float32)
    with pytest.raises(ValueError, match="shape"):
        trainer.set_adapter(adapter)
