"""The Workload interface (model + LoRA + data for one task) and the cache helpers workloads use."""

# Workload modules import this one; the registry that imports them by name is workloads.registry,
# so that no import here leads back to a workload (that would close a cycle). torch is only named
# in type hints: the gateway reads a workload's data half (capabilities) and has no torch.

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from workloads.data import Dataset

if TYPE_CHECKING:
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


@dataclass(frozen=True, slots=True)
class RunSize:
    """Default size of an `edgefl demo` or `edgefl emulate` run (its flags override each field)."""

    devices: int
    rounds: int
    local_steps: int
    learning_rate: float = 0.05


class WorkloadData(Protocol):
    """A workload's data half: private device shares and a held-out test set, in model format.

    Implementations import no torch (the gateway asks them about capabilities). Optional
    capabilities, read through `capability()`: `task_labellings` (names of a multi-task split,
    FL-TAC) with `local_tasks(index, num_devices, alpha, seed) -> {task: Dataset}` and
    `task_test_data(task, size) -> Dataset`, and `incremental_tasks` (a class-incremental schedule
    of label tuples, Fed-TaLoRA).
    """

    name: str
    labels: tuple[str, ...]
    batch_size: int
    demo: RunSize  # `edgefl demo`'s default fleet, rounds and local steps
    emulate: RunSize  # `edgefl emulate`'s
    eval_size: int  # test examples a demo scores each round

    def device_data(self, index: int, num_devices: int, alpha: float, seed: int) -> Dataset:
        """Device `index`'s Dirichlet(alpha) share of the private training data.

        Deterministic for a seed (every process computes the same split); every device gets at
        least two batches unless the fleet is too large for that (workloads.data.min_share).
        `device_data(0, 1, ...)` is the whole private training part (centralised baselines).
        """
        ...

    def test_data(self, size: int | None = None) -> Dataset:
        """The held-out test set no device trains on: its first `size` examples (None: all)."""
        ...


# capability attribute -> what a workload lacking it does not have, for the one-line error
CAPABILITIES = {
    "task_labellings": "multi-task split (FL-TAC)",
    "incremental_tasks": "class-incremental schedule (Fed-TaLoRA)",
}


def capability(workload: WorkloadData, attribute: str) -> object:
    """An optional capability of a workload (see CAPABILITIES).

    Raises:
        ValueError: The workload lacks it; the message is the user's one-line error.
    """
    value = getattr(workload, attribute, None)
    if value is None:
        raise ValueError(f"workload {workload.name} has no {CAPABILITIES[attribute]}")
    return value


def private_pool(workload: WorkloadData) -> Dataset:
    """All of a workload's private training data: one device's share of a one-device fleet."""
    return workload.device_data(0, 1, alpha=1.0, seed=0)


class Workload(WorkloadData, Protocol):
    """A classification task a federation fine-tunes with LoRA: the data half plus the model."""

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
