"""The Trainer interface every backend implements and the helpers the backends share."""

# Backends import this module, never edge_client.trainer: that one picks a backend by name, so
# it imports them, and an import back from a backend would close a cycle.

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol.manifest import Manifest
from protocol.tensors import TensorDict, canonical_key

# Logit of a masked class: exp(-1e4 - max) underflows to exactly 0 in float32, so masked classes
# get zero probability and zero gradient, yet unlike -inf it never makes NaN (-inf - -inf).
MASK_LOGIT = -1e4


@dataclass(frozen=True, slots=True)
class StepResult:
    """Loss of one batch and how many of its examples were classified correctly."""

    loss: float
    correct: int


class Trainer(Protocol):
    """One backend's training program with a mutable adapter. Batches have the manifest's shape."""

    backend: str
    manifest: Manifest

    def set_adapter(self, adapter: TensorDict) -> None:
        """Overwrite the adapter (canonical names, manifest shapes)."""
        ...

    def get_adapter(self) -> TensorDict:
        """Copy of the current adapter."""
        ...

    def set_learning_rate(self, learning_rate: float) -> None:
        """Learning rate of the SGD steps that follow."""
        ...

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """One forward/backward/SGD step on one batch."""
        ...

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Class scores of one batch, without changing the adapter."""
        ...

    def set_base_delta(self, deltas: dict[str, np.ndarray]) -> None:
        """Run with frozen weight W0 + delta for each LoRA layer (exact aggregation).

        `deltas` maps a layer path (e.g. "fc1") to a (d_out, d_in) matrix and replaces any
        earlier delta: W0 itself is kept. Raises NotImplementedError where frozen weights are
        compiled into the program (an ExecuTorch program exported without frozen inputs).
        """
        ...

    def set_class_mask(self, classes: Sequence[int] | None) -> None:
        """Restrict the model to `classes` (class-incremental learning, one task's classes).

        Logits of classes not in `classes` get MASK_LOGIT in train_step and logits(), so they
        get no probability and no gradient; None clears the mask. Raises ValueError for class
        ids outside [0, number of classes) or an empty list, and NotImplementedError where the
        bias is compiled into the program (an ExecuTorch program exported without frozen inputs)
        or the model has no logit_bias.
        """
        ...


def base_weight_name(layer: str) -> str:
    """Native (peft) name of a LoRA layer's frozen weight, shared by torch and ONNX Runtime."""
    return f"base_model.model.{layer}.base_layer.weight"


def logit_bias_name() -> str:
    """Native (peft) name of the frozen additive logit mask, shared by torch and ONNX Runtime."""
    return "base_model.model.logit_bias"


def find_logit_bias(names: Iterable[str]) -> str | None:
    """The name among `names` that is the logit bias, wrapped by peft or not (CoLoRA is not)."""
    wanted = canonical_key(logit_bias_name())
    return next((name for name in names if canonical_key(name) == wanted), None)


def class_mask_bias(classes: Sequence[int] | None, num_classes: int) -> np.ndarray:
    """The logit bias that keeps `classes`: 0 on them, MASK_LOGIT elsewhere (None: all zero)."""
    bias = np.zeros(num_classes, dtype=np.float32)
    if classes is None:
        return bias
    ids = [int(c) for c in classes]
    if not ids:
        raise ValueError("a class mask needs at least one class; pass None to clear it")
    outside = sorted({c for c in ids if not 0 <= c < num_classes})
    if outside:
        raise ValueError(f"class ids {outside} are outside [0, {num_classes})")
    bias[:] = MASK_LOGIT
    bias[ids] = 0.0
    return bias


def correct_count(logits: np.ndarray, labels: np.ndarray) -> int:
    """How many rows of `logits` pick their label."""
    return int((np.asarray(logits).argmax(-1) == np.asarray(labels)).sum())
