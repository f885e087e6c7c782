"""The native device's trainer (C++, through its C API) trains exactly like the Python ExecuTorch
backend: same losses, gradients and adapters from the same adapter and batches."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from edge_client.data import LocalTask
from edge_client.native import Buffer, NativeError, check, library, take, write_partition
from edge_client.trainer import Trainer, make_trainer
from protocol.manifest import BASE_DELTA, load_manifest
from protocol.tensors import TensorDict
from workloads.registry import get_workload_data

LEARNING_RATE = 0.05
STEPS = 3
# Both run the same program with the same runtime and the same SGD arithmetic, so they agree to
# float32 rounding at most; the brief's bound.
ATOL = 1e-6
WORKLOADS = ("fmnist-cnn", "minilm-fortunes")


@pytest.fixture(scope="module")
def minilm_artifacts() -> Path:
    from export.build import build_artifacts

    return build_artifacts("minilm-fortunes")


@pytest.fixture(scope="module")
def artifacts(cnn_artifacts: Path, minilm_artifacts: Path) -> dict[str, Path]:
    return {"fmnist-cnn": cnn_artifacts, "minilm-fortunes": minilm_artifacts}


@pytest.fixture(scope="module")
def lib(native_build: Path) -> ctypes.CDLL:
    lib = library()
    return lib


class Native:
    """The C API's trainer with the Python trainers' methods (numpy in, numpy out)."""

    def __init__(self, lib: ctypes.CDLL, artifact_dir: Path, learning_rate: float) -> None:
        self.lib = lib
        self.handle = lib.edgefl_trainer_create(str(artifact_dir).encode(), learning_rate)
        if not self.handle:
            raise NativeError(lib.edgefl_last_error().decode())

    def close(self) -> None:
        self.lib.edgefl_trainer_destroy(self.handle)

    def set_adapter(self, adapter: TensorDict) -> None:
        data = save(adapter)
        check(self.lib.edgefl_trainer_set_adapter(self.handle, data, len(data)))

    def get_adapter(self) -> TensorDict:
        out = Buffer()
        check(self.lib.edgefl_trainer_get_adapter(self.handle, ctypes.byref(out)))
        return load(take(out))

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> float:
        loss = ctypes.c_float()
        x, y = np.ascontiguousarray(inputs), np.ascontiguousarray(labels, dtype=np.int64)
        check(self.lib.edgefl_trainer_step(self.handle, x.ctypes.data, x.nbytes, y.ctypes.data,
                                           ctypes.byref(loss)))
        return loss.value

    def gradients(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, TensorDict]:
        loss, out = ctypes.c_float(), Buffer()
        x, y = np.ascontiguousarray(inputs), np.ascontiguousarray(labels, dtype=np.int64)
        check(self.lib.edgefl_trainer_gradients(self.handle, x.ctypes.data, x.nbytes,
                                                y.ctypes.data, ctypes.byref(loss),
                                                ctypes.byref(out)))
        return loss.value, load(take(out))

    def set_class_mask(self, classes: list[int] | None) -> None:
        ids = np.array(classes or [], dtype=np.int64)
        check(self.lib.edgefl_trainer_set_class_mask(self.handle, ids.ctypes.data, len(ids)))

    def set_base_delta(self, deltas: TensorDict) -> None:
        data = save(deltas)
        check(self.lib.edgefl_trainer_set_base_delta(self.handle, data, len(data)))


@pytest.fixture
def native(lib: ctypes.CDLL) -> Iterator[Callable[..., Native]]:
    """Opens native trainers by artifact folder; closes them after the test."""
    opened: list[Native] = []

    def open_trainer(artifact_dir: Path, learning_rate: float = LEARNING_RATE) -> Native:
        opened.append(Native(lib, artifact_dir, learning_rate))
        return opened[-1]

    yield open_trainer
    for trainer in opened:
        trainer.close()


def batches(workload: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` held-out batches of the workload's batch size (real data, not the export's)."""
    data = get_workload_data(workload)
    size = data.batch_size
    test = data.test_data(size * count)
    return [(test.x[i * size:(i + 1) * size], test.y[i * size:(i + 1) * size])
            for i in range(count)]


def perturbed(adapter: TensorDict, seed: int) -> TensorDict:
    """The adapter plus seeded noise: LoRA-B nonzero, so LoRA-A gets gradients too."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32)
            for k, v in adapter.items()}


def same_start(native: Callable[..., Native], artifact_dir: Path,
               seed: int) -> tuple[Trainer, Native, TensorDict]:
    """The Python ExecuTorch trainer and a native one, both holding the same perturbed adapter."""
    python = make_trainer("executorch", artifact_dir, LEARNING_RATE)
    device = native(artifact_dir)
    start = perturbed(python.get_adapter(), seed=seed)
    python.set_adapter(start)
    device.set_adapter(start)
    return python, device, start


def agree_then_step(python: Trainer, device: Native, x: np.ndarray, y: np.ndarray) -> float:
    """Assert both give the same loss and gradients on (x, y), and the same adapter after one
    step each; return the device's loss before the step."""
    want_loss, want = python.gradients(x, y)
    loss, got = device.gradients(x, y)
    assert abs(loss - want_loss) <= ATOL
    assert max_diff(got, want) <= ATOL
    assert abs(device.train_step(x, y) - python.train_step(x, y).loss) <= ATOL
    assert max_diff(device.get_adapter(), python.get_adapter()) <= ATOL
    return loss


def max_diff(a: TensorDict, b: TensorDict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_sgd_steps_give_the_python_losses_and_adapter(workload: str, artifacts, native) -> None:
    python, device, start = same_start(native, artifacts[workload], seed=1)
    assert max_diff(device.get_adapter(), start) == 0.0
    for x, y in batches(workload, STEPS):
        want = python.train_step(x, y).loss
        assert abs(device.train_step(x, y) - want) <= ATOL
    after = python.get_adapter()
    assert max_diff(device.get_adapter(), after) <= ATOL
    assert max_diff(after, start) > 1e-3, "the adapter did not train"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_gradients_match_python(workload: str, artifacts, native) -> None:
    python, device, start = same_start(native, artifacts[workload], seed=2)
    x, y = batches(workload, 1)[0]
    want_loss, want = python.gradients(x, y)
    loss, got = device.gradients(x, y)
    assert abs(loss - want_loss) <= ATOL
    assert max_diff(got, want) <= ATOL
    lora_a = [k for k in want if ".lora_A." in k]
    assert lora_a and all(np.abs(want[k]).max() > 1e-6 for k in lora_a)
    # gradients() takes no step
    assert max_diff(device.get_adapter(), start) == 0.0


@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_class_mask_changes_the_loss_as_in_python(workload: str, artifacts, native) -> None:
    python, device, _ = same_start(native, artifacts[workload], seed=3)
    # A batch of two classes only, masked to three: the other logits drop out of the softmax.
    data = get_workload_data(workload)
    test = data.test_data(400)
    keep = np.flatnonzero(np.isin(test.y, [0, 2]))[: data.batch_size]
    assert len(keep) == data.batch_size
    x, y = test.x[keep], test.y[keep]
    unmasked, _ = device.gradients(x, y)
    python.set_class_mask([0, 1, 2])
    device.set_class_mask([0, 1, 2])
    assert abs(agree_then_step(python, device, x, y) - unmasked) > 1e-3
    device.set_class_mask(None)  # cleared: the model as exported again
    python.set_class_mask(None)
    assert abs(device.gradients(x, y)[0] - python.gradients(x, y)[0]) <= ATOL


def test_a_base_delta_matches_python(minilm_artifacts: Path, native) -> None:
    python, device, _ = same_start(native, minilm_artifacts, seed=4)
    x, y = batches("minilm-fortunes", 1)[0]
    plain, _ = device.gradients(x, y)
    layer = next(s for s in load_manifest(minilm_artifacts).frozen_inputs if s.kind == BASE_DELTA)
    delta = {layer.name: np.random.default_rng(5).normal(0.0, 0.05, layer.shape)
             .astype(np.float32)}
    python.set_base_delta(delta)
    device.set_base_delta(delta)
    assert abs(agree_then_step(python, device, x, y) - plain) > 1e-4


def test_bad_inputs_give_one_line_errors(lib, cnn_artifacts: Path, native, tmp_path) -> None:
    device = native(cnn_artifacts)
    start = device.get_adapter()
    x, y = batches("fmnist-cnn", 1)[0]
    some = next(iter(start))

    def fails(call: Callable[..., object], *args: object) -> str:
        with pytest.raises(NativeError) as caught:
            call(*args)
        message = str(caught.value)
        assert message and "\n" not in message
        return message

    assert "bytes" in fails(device.train_step, x[:31], y[:31])
    assert "bytes" in fails(device.gradients, x.astype(np.float64), y)
    fails(device.train_step, x, np.full_like(y, 10))  # label outside the classes
    assert "nope" in fails(device.set_adapter, {**start, "nope": np.zeros(3, np.float32)})
    assert some in fails(device.set_adapter, {some: np.zeros((1, 2), np.float32)})
    fails(device.set_adapter, {some: start[some].astype(np.float64)})
    assert "10" in fails(device.set_class_mask, [0, 10])
    fails(device.set_class_mask, [-1])
    fails(device.set_base_delta, {"nope": np.zeros((2, 2), np.float32)})
    fails(device.set_base_delta, {"fc1": np.zeros((2, 2), np.float32)})
    fails(check, lib.edgefl_trainer_set_adapter(device.handle, b"not safetensors", 15))
    fails(check, lib.edgefl_trainer_step(None, x.ctypes.data, x.nbytes, y.ctypes.data, None))
    assert max_diff(device.get_adapter(), start) == 0.0  # nothing half-applied
    assert not lib.edgefl_trainer_create(str(tmp_path).encode(), 0.05)
    assert "manifest" in lib.edgefl_last_error().decode()


def test_set_adapter_keeps_tensors_not_given(cnn_artifacts: Path, native) -> None:
    device = native(cnn_artifacts)
    start = device.get_adapter()
    head = {"head.bias": np.arange(10, dtype=np.float32)}
    device.set_adapter(head)
    after = device.get_adapter()
    np.testing.assert_array_equal(after["head.bias"], head["head.bias"])
    assert all(np.array_equal(after[k], start[k]) for k in start if k != "head.bias")


def run_partition(lib: ctypes.CDLL, device: Native, path: Path, task: str | None, steps: int,
                  seed: int) -> tuple[float, float]:
    loss, accuracy = ctypes.c_double(), ctypes.c_double()
    check(lib.edgefl_trainer_train_partition(device.handle, str(path).encode(),
                                             task.encode() if task else None, steps, seed,
                                             ctypes.byref(loss), ctypes.byref(accuracy)))
    return loss.value, accuracy.value


@pytest.mark.parametrize("workload", WORKLOADS)
def test_local_training_on_a_partition_file(workload: str, artifacts, lib, native,
                                            tmp_path: Path) -> None:
    """read_partition + train_local: one pass over exactly one batch is that batch, in some
    order, so its loss and step are Python's on the same examples (a mean does not care)."""
    python, device, _ = same_start(native, artifacts[workload], seed=6)
    x, y = batches(workload, 1)[0]
    path = write_partition(tmp_path / "one.safetensors", [LocalTask("", x, y)])
    loss, accuracy = run_partition(lib, device, path, None, 1, seed=7)
    want = python.train_step(x, y)
    assert abs(loss - want.loss) <= ATOL
    assert accuracy == want.correct / len(y)
    assert max_diff(device.get_adapter(), python.get_adapter()) <= ATOL


def test_partition_slots_and_small_tasks(lib, cnn_artifacts: Path, native,
                                         tmp_path: Path) -> None:
    device = native(cnn_artifacts)
    (x, y), (x2, y2) = batches("fmnist-cnn", 2)
    tasks = [LocalTask("shoes", x[:5], y[:5]), LocalTask("tops", x2, y2)]
    path = write_partition(tmp_path / "slots.safetensors", tasks)
    start = device.get_adapter()
    # 5 examples fill a batch of 32 with replacement; 3 steps cross a pass boundary.
    loss, accuracy = run_partition(lib, device, path, "shoes", 3, seed=1)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
    assert max_diff(device.get_adapter(), start) > 1e-4
    again = native(cnn_artifacts)
    assert run_partition(lib, again, path, "shoes", 3, seed=1) == (loss, accuracy)  # seeded
    assert np.isfinite(run_partition(lib, device, path, "tops", 4, seed=2)[0])
    with pytest.raises(NativeError, match="several"):
        run_partition(lib, device, path, None, 1, seed=1)
    with pytest.raises(NativeError, match="nope"):
        run_partition(lib, device, path, "nope", 1, seed=1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save({"inputs": x, "labels": y[:3].astype(np.int64)}))
    with pytest.raises(NativeError, match="examples"):
        run_partition(lib, device, bad, None, 1, seed=1)
