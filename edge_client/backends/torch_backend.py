"""Reference trainer in eager PyTorch + peft: the baseline every parity test compares with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edge_client.trainer_base import (
    StepResult,
    base_weight_name,
    class_mask_bias,
    correct_count,
    find_logit_bias,
)
from protocol.manifest import Manifest
from protocol.tensors import TensorDict, is_personal
from workloads.base import file_sha256
from workloads.lora import get_adapter, set_adapter
from workloads.registry import get_workload


class TorchTrainer:
    """Builds the workload's model from its base weights; SGD on the adapter only."""

    backend = "torch"

    def __init__(self, manifest: Manifest, learning_rate: float) -> None:
        self.manifest = manifest
        workload = get_workload(manifest.workload)
        base = workload.base_weights()
        if file_sha256(base) != manifest.base_sha256:
            raise ValueError(
                f"base weights {base} do not match the manifest's base_sha256; re-export"
            )
        self.model = workload.build(base, seed=int(manifest.lora.get("seed", 0)))
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self._params, lr=learning_rate)
        self._base_weights: dict[str, torch.Tensor] = {}  # W0 of layers given a base delta

    def set_adapter(self, adapter: TensorDict) -> None:
        """Overwrite the adapter."""
        self.manifest.check_adapter(adapter, shared_only=not any(map(is_personal, adapter)))
        set_adapter(self.model, adapter)

    def get_adapter(self) -> TensorDict:
        """Copy of the adapter."""
        return get_adapter(self.model)

    def set_learning_rate(self, learning_rate: float) -> None:
        """SGD learning rate for the next steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> StepResult:
        """One SGD step."""
        self.optimizer.zero_grad()
        logits = self.model(torch.from_numpy(inputs))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        loss.backward()
        self.optimizer.step()
        return StepResult(loss.item(), correct_count(logits.detach().numpy(), labels))

    def gradients(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, TensorDict]:
        """Loss and adapter gradients of one batch, without a step (for parity checks)."""
        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            self.model(torch.from_numpy(inputs)), torch.from_numpy(labels)
        )
        loss.backward()
        from protocol.tensors import canonical_key

        grads = {
            canonical_key(n): p.grad.detach().numpy().copy()
            for n, p in self.model.named_parameters() if p.requires_grad
        }
        self.optimizer.zero_grad()
        return loss.item(), grads

    def set_base_delta(self, deltas: dict[str, np.ndarray]) -> None:
        """Frozen weight of each layer := W0 + delta (W0 kept from the first call)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for layer, delta in deltas.items():
                weight = params[base_weight_name(layer)]
                original = self._base_weights.setdefault(layer, weight.detach().clone())
                weight.copy_(original + torch.from_numpy(delta).to(weight.dtype))

    def set_class_mask(self, classes: Sequence[int] | None) -> None:
        """Logits of classes outside `classes` := MASK_LOGIT (None clears the mask)."""
        params = dict(self.model.named_parameters())
        name = find_logit_bias(params)
        if name is None:
            raise NotImplementedError(
                f"workload {self.manifest.workload!r} has no logit_bias: it cannot mask classes")
        bias = class_mask_bias(classes, len(self.manifest.labels))
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(bias))

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Class scores, no gradient."""
        with torch.no_grad():
            return self.model(torch.from_numpy(inputs)).numpy()
