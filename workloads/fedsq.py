"""FedSQ on the CNN: a frozen structural copy fixes the ReLU gates; LoRA trains the quantitative one.

Pérez-Corral, Mestre, Fernández-Hernández, Dolz, Duato, Quintana-Ortí, "FedSQ: Optimized Weight
Averaging via Fixed Gating", arXiv 2604.02990 (ALGORITHMS.md §2). The structural copy S of the
pretrained backbone computes binary masks m_l(x) = 1[z_l^S(x) > 0]; the quantitative copy Q uses
them in place of its own ReLUs, h_l = m_l(x) ⊙ z_l^Q, and only Q is trained and averaged (FedAvg).
Two departures, both flagged in the notes as design choices rather than paper results: Q is
W0 + s·B·A (LoRA on fc1/fc2 plus a new head, so the payload equals the plain CNN's), not full
weights; and the per-layer gating form is a reconstruction ([UNVERIFIED]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from workloads import fmnist
from workloads.lora import with_lora_and_new_head
from workloads.cnn import LORA_ALPHA, LORA_RANK, LORA_TARGETS, Cnn, FmnistCnn

# A full-match regex, so peft adapts Q's fc1/fc2 and never the structural copy's
# ("structure.fc1" does not match).
LORA_TARGET_REGEX = "|".join(LORA_TARGETS)


class StructuralGates(nn.Module):
    """The frozen structural copy's gated layers: fc1 and fc2 of the pretrained backbone."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.requires_grad_(False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, 128) and (B, 64) as 0/1 floats: constants, so no gradient flows into S."""
        z1 = self.fc1(feats)
        z2 = self.fc2(torch.relu(z1))
        return (z1 > 0).to(feats.dtype), (z2 > 0).to(feats.dtype)


class GatedCnn(Cnn):
    """The quantitative copy Q of the CNN, gated by the structural copy S after fc1 and fc2.

    The convolutions are frozen and identical in S and Q, so S's convolution masks equal Q's own
    ReLUs (and S's max-pool choices equal Q's): the trunk is computed once, which is exact.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.structure = StructuralGates(nn.Linear(32 * 7 * 7, 128), nn.Linear(128, 64))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28) -> (B, 1568)
        """The frozen convolutional trunk shared by S and Q."""
        x = self.pool(self.relu(self.conv1(x)))
        return self.pool(self.relu(self.conv2(x))).flatten(1)

    def forward_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from trunk features: Q's layers with S's gates instead of ReLUs."""
        mask1, mask2 = self.structure(feats)
        h = mask1 * self.fc1(feats)  # (B, 128)
        h = mask2 * self.fc2(h)  # (B, 64)
        return self.head(h) + self.logit_bias  # (B, classes); the class mask, as in Cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.features(x))

    def gate_disagreement(self, feats: torch.Tensor) -> float:
        """Fraction of gated units where S's gate differs from the sign of Q's pre-activation.

        A diagnostic: at 0, FedSQ computes exactly what plain LoRA (Q with its own ReLUs) would.
        """
        with torch.no_grad():
            mask1, mask2 = self.structure(feats)
            z1 = self.fc1(feats)
            z2 = self.fc2(mask1 * z1)
            flips = ((z1 > 0) != mask1.bool()).sum() + ((z2 > 0) != mask2.bool()).sum()
            return float(flips) / float(mask1.numel() + mask2.numel())


def build_fedsq(base_weights: Path, seed: int = 0) -> nn.Module:
    """S and Q from one pretrained backbone; Q gets LoRA on fc1/fc2 and a fresh head (seeded).

    Returns the peft-wrapped GatedCnn in eval mode; its trainable tensors have the same canonical
    names and shapes as FmnistCnn's adapter, so manifests, codecs and strategies are shared.
    """
    state = load_file(str(base_weights))
    del state["head.weight"], state["head.bias"]
    model = GatedCnn(len(fmnist.LABELS))
    for layer in ("fc1", "fc2"):
        for part in ("weight", "bias"):
            state[f"structure.{layer}.{part}"] = state[f"{layer}.{part}"].clone()
    model.load_state_dict(state, strict=False)
    return with_lora_and_new_head(model, LORA_RANK, LORA_ALPHA, LORA_TARGET_REGEX, seed)


class FmnistFedSq(FmnistCnn):
    """The CNN workload with FedSQ gating: same data, base weights and adapter layout."""

    name = "fmnist-fedsq"

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """The FedSQ model (see build_fedsq)."""
        return build_fedsq(base_weights, seed)

    def lora_summary(self) -> dict[str, object]:
        """LoRA settings plus the gating, for the manifest."""
        return super().lora_summary() | {"gating": "fedsq-structural-fc1-fc2"}
