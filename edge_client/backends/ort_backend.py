"""ONNX Runtime training trainer: training/eval/optimizer graphs over a shared checkpoint state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_client.native_logs import ORT_ERRORS_ONLY, is_quiet
from edge_client.trainer_base import (
    StepResult,
    base_weight_name,
    class_mask_bias,
    correct_count,
    find_logit_bias,
)
from protocol.manifest import Manifest
from protocol.tensors import TensorDict, canonical_key, is_personal


class OrtTrainer:
    """Adapter tensors are the checkpoint's trainable parameters, addressed by name."""

    backend = "onnxruntime"

    def __init__(self, artifact_dir: Path, manifest: Manifest, learning_rate: float) -> None:
        from onnxruntime import SessionOptions
        from onnxruntime.training import api

        if "onnxruntime" not in manifest.files:
            raise FileNotFoundError(f"{artifact_dir} has no ONNX Runtime artifacts")
        self.manifest = manifest
        folder = Path(artifact_dir) / manifest.files["onnxruntime"]
        self.state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        options = SessionOptions()
        if is_quiet():
            # Loading the graphs logs each initializer the optimiser drops and each lenient
            # shape merge as a warning; they are the exporter's business, not the device's.
            options.log_severity_level = ORT_ERRORS_ONLY
        self.module = api.Module(
            str(folder / "training_model.onnx"), self.state, str(folder / "eval_model.onnx"),
            session_options=options,
        )
        self.optimizer = api.Optimizer(str(folder / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(learning_rate)
        self._base_weights: dict[str, np.ndarray] = {}  # W0 of layers given a base delta
        self._native = {
            canonical_key(name): name for name, param in self.state.parameters
            if param.requires_grad
        }

    def set_adapter(self, adapter: TensorDict) -> None:
        """Write the adapter into the checkpoint state (shared by train and eval graphs)."""
        self.manifest.check_adapter(adapter, shared_only=not any(map(is_personal, adapter)))
        for key, native in self._native.items():
            if key in adapter:  # personal tensors keep their values when only shared come
                self.state.parameters[native] = np.ascontiguousarray(adapter[key])

    def get_adapter(self) -> TensorDict:
        """Copy of the adapter."""
        return {k: self.state.parameters[n].data.copy() for k, n in self._native.items()}

    def set_learning_rate(self, learning_rate: float) -> None:
        """SGD learning rate for the next steps."""
        self.optimizer.set_learning_rate(learning_rate)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """Forward + backward in the training graph, SGD in the optimizer graph."""
        self.module.train()
        loss, logits = self.module(np.ascontiguousarray(inputs), labels)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return StepResult(float(loss), correct_count(logits, labels))

    def gradients(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, TensorDict]:
        """Loss and adapter gradients of one batch, without a step (for parity checks)."""
        self.module.train()
        loss, _ = self.module(np.ascontiguousarray(inputs), labels)
        grads = {k: self.state.parameters[n].grad.copy() for k, n in self._native.items()}
        self.module.lazy_reset_grad()
        return float(loss), grads

    def set_base_delta(self, deltas: dict[str, np.ndarray]) -> None:
        """Frozen weight of each layer := W0 + delta; frozen weights live in the checkpoint state."""
        for layer, delta in deltas.items():
            name = base_weight_name(layer)
            original = self._base_weights.setdefault(layer, self.state.parameters[name].data.copy())
            self.state.parameters[name] = (original + delta).astype(original.dtype)

    def set_class_mask(self, classes: Sequence[int] | None) -> None:
        """Logits outside `classes` := MASK_LOGIT; the frozen bias lives in the checkpoint state."""
        name = find_logit_bias(name for name, _ in self.state.parameters)
        if name is None:
            raise NotImplementedError(
                f"workload {self.manifest.workload!r} has no logit_bias: it cannot mask classes")
        self.state.parameters[name] = class_mask_bias(classes, len(self.manifest.labels))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Class scores from the eval graph."""
        self.module.eval()
        _, logits = self.module(
            np.ascontiguousarray(inputs), np.zeros(len(inputs), dtype=np.int64)
        )
        return np.asarray(logits)
