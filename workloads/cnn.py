"""Small ReLU CNN for Fashion-MNIST: backbone pretrained on a public slice, LoRA on its MLP."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workloads import fmnist
from workloads.base import cache_root, file_sha256
from workloads.lora import with_lora_and_new_head

logger = logging.getLogger(__name__)

PRETRAIN_EPOCHS = 3
PRETRAIN_SEED = 1234
# LoRA sits on the linear layers only. ExecuTorch 1.5.1's portable convolution_backward gives
# wrong weight gradients for peft's conv LoRA (measured: off by up to 5.0 against eager), while the
# linear path matches eager to 1e-7; the convolutions stay frozen feature extractors.
LORA_TARGETS = ("fc1", "fc2")
LORA_RANK = 4
LORA_ALPHA = 8


class Cnn(nn.Module):
    """conv(1->16) -> pool -> conv(16->32) -> pool -> fc1(1568->128) -> fc2(128->64) -> head(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()
        # A frozen, settable additive mask on the logits (class-incremental learning): devices
        # set MASK_LOGIT (edge_client.trainer_base) on classes outside the current task. ONNX
        # Runtime keeps frozen parameters in its checkpoint state, so the mask changes after
        # export; the ExecuTorch program takes it as an input instead (manifest.frozen_inputs).
        self.logit_bias = nn.Parameter(torch.zeros(num_classes), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = self.pool(self.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.pool(self.relu(self.conv2(x)))  # (B, 32, 7, 7)
        x = self.relu(self.fc1(x.flatten(1)))  # (B, 128)
        x = self.relu(self.fc2(x))  # (B, 64)
        return self.head(x) + self.logit_bias  # (B, 10)


def pretrain_backbone(out: Path, epochs: int = PRETRAIN_EPOCHS) -> None:
    """Train the CNN centrally on the public slice of Fashion-MNIST and save it (reproducible)."""
    torch.manual_seed(PRETRAIN_SEED)
    public, _ = fmnist.public_and_private(fmnist.load("train"))
    model = Cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(PRETRAIN_SEED)
    x, y = torch.from_numpy(public.x), torch.from_numpy(public.y)
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(public)))
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
        logger.info("pretrain epoch %d/%d: last loss %.3f", epoch + 1, epochs, loss.item())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # per process: concurrent builders never clash
    save_file(model.state_dict(), str(tmp))
    tmp.replace(out)  # atomic: a crash never leaves a half-written backbone in the cache


class FmnistCnn(fmnist.FashionMnistData):
    """The federation's default workload: fine-tune a new 10-class head and LoRA on fc1/fc2."""

    name = "fmnist-cnn"

    def base_weights(self) -> Path:
        """The pretrained backbone, keyed by this file's source so edits rebuild it."""
        key = file_sha256(Path(__file__), Path(fmnist.__file__))[:16]
        path = cache_root() / "backbones" / f"fmnist-cnn-{key}.safetensors"
        if not path.exists():
            logger.info("pretraining the CNN backbone on the public slice -> %s", path)
            pretrain_backbone(path)
        return path

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """Backbone from `base_weights`; a fresh head (seeded) replaces the pretraining head.

        The head is re-initialised so that federated fine-tuning has to learn the classes from
        the devices' private data; the backbone keeps the features learnt on the public slice.
        """
        model = Cnn(len(self.labels))
        state = load_file(str(base_weights))
        del state["head.weight"], state["head.bias"]
        model.load_state_dict(state, strict=False)
        return with_lora_and_new_head(model, LORA_RANK, LORA_ALPHA, LORA_TARGETS, seed)

    def lora_summary(self) -> dict[str, object]:
        """LoRA settings recorded in the manifest."""
        return {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS),
                "trainable_modules": ["head"]}

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random inputs of the right shape (values do not matter for export)."""
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, len(self.labels), (batch_size,), generator=generator))
