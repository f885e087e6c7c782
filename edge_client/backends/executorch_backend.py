"""ExecuTorch trainer: runs the exported joint forward/backward program with ExecuTorch's SGD."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edge_client.trainer import StepResult, correct_count
from protocol.manifest import Manifest
from protocol.tensors import TensorDict, canonical_key, is_personal


class ExecuTorchTrainer:
    """Adapter tensors live inside the program; named_parameters() aliases them in place."""

    backend = "executorch"

    def __init__(self, artifact_dir: Path, manifest: Manifest, learning_rate: float) -> None:
        from executorch.extension.training import _load_for_executorch_for_training

        if "executorch" not in manifest.files:
            raise FileNotFoundError(f"{artifact_dir} has no ExecuTorch program")
        self.manifest = manifest
        # Load by path: the runtime keeps pointers into the program's bytes, and a buffer handed
        # over from Python would be freed under it once this constructor returns.
        self.module = _load_for_executorch_for_training(
            str(Path(artifact_dir) / manifest.files["executorch"])
        )
        # The runtime materialises named_parameters() only after a first forward_backward; a
        # zero batch does it without touching the weights (a step is a separate call).
        self._run(np.zeros(manifest.input_shape, dtype=manifest.input_dtype),
                  np.zeros(manifest.batch_size, dtype=np.int64))
        self._params = {canonical_key(n): t for n, t in self.module.named_parameters().items()}
        self._learning_rate = learning_rate
        self._make_optimizer()

    def _make_optimizer(self) -> None:
        from executorch.extension.training import get_sgd_optimizer

        # Plain SGD (no momentum): stateless, so it matches the other backends step for step.
        self.optimizer = get_sgd_optimizer(
            self.module.named_parameters(), self._learning_rate, 0.0, 0.0, 0.0, False
        )

    def _run(self, inputs: np.ndarray, labels: np.ndarray) -> list[torch.Tensor]:
        return self.module.forward_backward(
            "forward", (torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels))
        )

    def set_adapter(self, adapter: TensorDict) -> None:
        """Copy the adapter into the program's parameter memory."""
        self.manifest.check_adapter(adapter, shared_only=not any(map(is_personal, adapter)))
        with torch.no_grad():
            for key, tensor in self._params.items():
                if key in adapter:  # personal tensors keep their values when only shared come
                    tensor.copy_(torch.from_numpy(adapter[key]))

    def get_adapter(self) -> TensorDict:
        """Copy of the adapter."""
        return {k: t.detach().numpy().copy() for k, t in self._params.items()}

    def set_learning_rate(self, learning_rate: float) -> None:
        """SGD learning rate for the next steps."""
        if learning_rate != self._learning_rate:
            self._learning_rate = learning_rate
            self._make_optimizer()

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """One joint forward/backward, then an SGD step with the program's gradients."""
        loss, logits, *_ = self._run(inputs, labels)
        self.optimizer.step(self.module.named_gradients())
        return StepResult(float(loss), correct_count(logits.numpy(), labels))

    def gradients(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, TensorDict]:
        """Loss and adapter gradients of one batch, without a step (for parity checks)."""
        loss, *_ = self._run(inputs, labels)
        grads = {canonical_key(n): g.numpy().copy()
                 for n, g in self.module.named_gradients().items()}
        return float(loss), grads

    def set_base_delta(self, deltas: dict[str, np.ndarray]) -> None:
        """Not possible: the .pte holds frozen weights as constants, not as mutable tensors."""
        raise NotImplementedError(
            "ExecuTorch programs compile frozen weights in; exact aggregation needs devices "
            "on the torch or onnxruntime backend")

    def set_class_mask(self, classes: Sequence[int] | None) -> None:
        """Not possible: the .pte holds the frozen logit bias as a constant."""
        raise NotImplementedError(
            "ExecuTorch programs compile the logit bias in; class masks need devices on the "
            "torch or onnxruntime backend")

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Class scores (the program also computes gradients; they are discarded)."""
        _, logits, *_ = self._run(inputs, np.zeros(len(inputs), dtype=np.int64))
        return logits.numpy().copy()
