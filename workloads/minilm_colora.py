"""minilm-colora: MiniLM on fortunes with CoLoRA (a personal r×r core) on query/value."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# workloads.minilm first: its fortune_tokens import switches huggingface_hub offline before peft
# (imported by workloads.colora through workloads.lora) imports it.
from workloads.minilm import (
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    MiniLmClassifier,
    MiniLmFortunes,
    load_encoder,
)
from workloads.colora import PERSONAL_SUMMARY, add_colora


class MiniLmCoLora(MiniLmFortunes):
    """minilm-fortunes with CoLoRA layers on every attention query and value (rank 8, alpha 16)."""

    name = "minilm-colora"

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """Frozen encoder; a seeded head and CoLoRA on query/value train (cores start at I).

        `seed` fixes the head and the A factors, so every device starts from the same shared
        adapter; the head equals minilm-fortunes' for the same seed.
        """
        model = MiniLmClassifier(load_encoder(base_weights), len(self.labels),
                                 self.tokenizer.pad_token_id)
        model.requires_grad_(False)
        # Seeded as with_lora_and_new_head does: the head first, then the adapter's A factors.
        torch.manual_seed(seed)
        model.head.reset_parameters()
        model.head.requires_grad_(True)
        return add_colora(model, LORA_TARGETS, LORA_RANK, LORA_ALPHA).eval()

    def lora_summary(self) -> dict[str, object]:
        """LoRA settings plus the personal cores, for the manifest."""
        return super().lora_summary() | PERSONAL_SUMMARY
