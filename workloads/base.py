"""The Workload interface (model + LoRA + data for one task) and the registry of workloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from workloads import WORKLOAD_NAMES

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


def get_workload(name: str) -> Workload:
    """Look a workload up by name."""
    # Imported here so that using one workload never loads the other's heavy dependencies.
    if name == "fmnist-cnn":
        from workloads.cnn import FmnistCnn

        return FmnistCnn()
    if name == "fmnist-fedsq":
        from workloads.fedsq import FmnistFedSq

        return FmnistFedSq()
    if name == "fmnist-colora":
        from workloads.colora import FmnistCoLora

        return FmnistCoLora()
    if name == "minilm-fortunes":
        from workloads.minilm import MiniLmFortunes

        return MiniLmFortunes()
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOAD_NAMES}")

