"""ExecuTorch trainer: runs the exported joint forward/backward program with ExecuTorch's SGD.

A .pte holds frozen weights as constants, so base deltas (exact aggregation) and the logit bias
(class masks) are program inputs after (inputs, labels), listed in the manifest's frozen_inputs.
The trainer keeps one tensor per frozen input (zeros until set) and passes them on every call.
Programs exported before frozen inputs existed have none and refuse both operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edge_client.native_logs import native_stderr_silenced
from edge_client.trainer_base import StepResult, class_mask_bias, correct_count
from protocol.manifest import BASE_DELTA, LOGIT_BIAS, Manifest
from protocol.tensors import TensorDict, canonical_key, is_personal


class ExecuTorchTrainer:
    """Adapter tensors live inside the program; named_parameters() aliases them in place."""

    backend = "executorch"

    def __init__(self, artifact_dir: Path, manifest: Manifest, learning_rate: float) -> None:
        from executorch.extension.training import _load_for_executorch_for_training

        if "executorch" not in manifest.files:
            raise FileNotFoundError(f"{artifact_dir} has no ExecuTorch program")
        self.manifest = manifest
        # (kind, name) -> the value passed for that frozen input, in program order; zeros keep
        # the model as exported (W0 itself, no mask).
        self._frozen = {(spec.kind, spec.name): torch.zeros(spec.shape, dtype=torch.float32)
                        for spec in manifest.frozen_inputs}
        # Load by path: the runtime keeps pointers into the program's bytes, and a buffer handed
        # over from Python would be freed under it once this constructor returns.
        # The first run also sizes the runtime's thread pool, and cpuinfo prints what it reads
        # of /sys to fd 2 as it does (silenced unless verbose).
        with native_stderr_silenced():
            self.module = _load_for_executorch_for_training(
                str(Path(artifact_dir) / manifest.files["executorch"])
            )
            # The runtime materialises named_parameters() only after a first forward_backward;
            # a zero batch does it without touching the weights (a step is a separate call).
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
            "forward", (torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels),
                        *self._frozen.values())
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
        """Frozen weight of each layer := W0 + delta (program inputs; W0 stays in the program).

        Like the other backends: a layer's delta replaces its earlier one, layers not in `deltas`
        keep theirs. Nothing changes unless every layer is known (KeyError) with the right shape
        (ValueError).
        """
        if not any(kind == BASE_DELTA for kind, _ in self._frozen):
            raise NotImplementedError(
                "this ExecuTorch program compiles its frozen weights in (exported before frozen "
                "inputs); re-export it for exact aggregation")
        for layer, delta in deltas.items():
            self._check_shape((BASE_DELTA, layer), delta)
        for layer, delta in deltas.items():
            # a float32 copy: the server's factors may come as float64 or read-only arrays
            self._frozen[(BASE_DELTA, layer)].copy_(torch.from_numpy(np.array(delta, np.float32)))

    def set_class_mask(self, classes: Sequence[int] | None) -> None:
        """Logits outside `classes` := MASK_LOGIT, through the program's logit-bias input."""
        key = (LOGIT_BIAS, LOGIT_BIAS)
        if key not in self._frozen:
            raise NotImplementedError(
                f"this ExecuTorch program of workload {self.manifest.workload!r} has no logit-bias "
                "input (no logit_bias, or exported before frozen inputs): it cannot mask classes")
        bias = class_mask_bias(classes, len(self.manifest.labels))  # ValueError before any change
        self._frozen[key].copy_(torch.from_numpy(bias))

    def _check_shape(self, key: tuple[str, str], value: np.ndarray) -> None:
        """KeyError if the program has no such frozen input, ValueError if the shape differs."""
        if key not in self._frozen:
            known = sorted(name for kind, name in self._frozen if kind == key[0])
            raise KeyError(f"no {key[0]} input for {key[1]!r}; the program has {known}")
        want = tuple(self._frozen[key].shape)
        if tuple(np.shape(value)) != want:
            raise ValueError(
                f"{key[0]} for {key[1]!r} has shape {np.shape(value)}, expected {want}")

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Class scores (the program also computes gradients; they are discarded)."""
        _, logits, *_ = self._run(inputs, np.zeros(len(inputs), dtype=np.int64))
        return logits.numpy().copy()
