"""Local data of emulated devices: Dirichlet shares of Fashion-MNIST's private part."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workloads import fmnist

MIN_EXAMPLES = 64  # every device must fill a couple of 32-example batches


@dataclass(frozen=True)
class LocalTask:
    """One local task of a device: its slot name ("" for a device's only task) and data."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray


def device_partitions(
    num_devices: int, alpha: float, seed: int
) -> tuple[fmnist.Dataset, list[np.ndarray]]:
    """The private training data and each device's indices into it (non-IID, Dirichlet)."""
    _, private = fmnist.public_and_private(fmnist.load("train"))
    parts = fmnist.dirichlet_split(
        private.y, num_devices, alpha, np.random.default_rng(seed), min_size=MIN_EXAMPLES
    )
    return private, parts


def device_data(index: int, num_devices: int, alpha: float, seed: int) -> fmnist.Dataset:
    """Data of device `index` of `num_devices` (the same split on every process for one seed)."""
    if not 0 <= index < num_devices:
        raise ValueError(f"device index {index} outside 0..{num_devices - 1}")
    private, parts = device_partitions(num_devices, alpha, seed)
    return private.subset(parts[index])


def multitask_tasks(data: fmnist.Dataset, seed: int) -> dict[str, LocalTask]:
    """Split one device's share into two local tasks over disjoint images (FL-TAC's setting).

    One half is labelled by clothing type, the other by garment group
    (fmnist.TASK_LABELLINGS). Keys are the true labelling; slot names are "t0"/"t1" in a
    random order per device, so they tell the aggregator nothing about the task.
    """
    rng = np.random.default_rng(seed)
    halves = np.array_split(rng.permutation(len(data)), len(fmnist.TASK_LABELLINGS))
    slots = rng.permutation(len(fmnist.TASK_LABELLINGS))
    return {
        task: LocalTask(f"t{slot}", data.x[np.sort(half)],
                        fmnist.task_labels(task, data.y[np.sort(half)]))
        for task, half, slot in zip(fmnist.TASK_LABELLINGS, halves, slots, strict=True)
    }
