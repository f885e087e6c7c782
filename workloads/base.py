"""The Workload interface (model + LoRA + data for one task) and the cache helpers workloads use."""

# Workload modules import this one; the registry that imports them by name is workloads.registry,
# so that no import here leads back to a workload (that would close a cycle).

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Folder for large built files (backbones, exported programs); git ignores it."""
    root = Path(os.environ.get("EDGEFL_CACHE", REPO_ROOT / ".cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(*paths: Path) -> str:
    """sha256 over the bytes of the given files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class Workload(Protocol):
    """A classification task a federation fine-tunes with LoRA."""

    name: str
    labels: tuple[str, ...]
    batch_size: int

    def base_weights(self) -> Path:
        """Path of the pretrained base weights (built and cached if needed)."""
        ...

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """The LoRA-wrapped classifier, in eval mode, with only the adapter trainable.

        forward(inputs) -> logits. `seed` fixes the initial adapter.
        """
        ...

    def lora_summary(self) -> dict[str, object]:
        """The LoRA configuration, for the manifest."""
        ...

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (inputs, labels) batch with the right shapes and dtypes, for export."""
        ...
