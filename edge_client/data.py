"""Local data of emulated devices: a workload's Dirichlet shares, and FL-TAC's local tasks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workloads.base import WorkloadData, capability
from workloads.data import Dataset
from workloads.registry import get_workload_data


@dataclass(frozen=True)
class LocalTask:
    """One local task of a device: its slot name ("" for a device's only task) and data."""

    name: str
    inputs: np.ndarray
    labels: np.ndarray


def device_partitions(
    num_devices: int, alpha: float, seed: int, workload: str = "fmnist-cnn"
) -> tuple[Dataset, list[np.ndarray]]:
    """Every device's share at once: the shares concatenated, and each device's indices into it.

    `pool.subset(parts[i])` is `device_data(i, ...)` of the workload (tests weigh shares by it).
    """
    data = get_workload_data(workload)
    shares = [data.device_data(i, num_devices, alpha, seed) for i in range(num_devices)]
    bounds = np.cumsum([0, *(len(s) for s in shares)])
    pool = Dataset(np.concatenate([s.x for s in shares]), np.concatenate([s.y for s in shares]),
                   shares[0].source)
    return pool, [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def multitask_tasks(workload: WorkloadData, data: Dataset, seed: int) -> dict[str, LocalTask]:
    """Split one device's share into local tasks over disjoint examples (FL-TAC's setting).

    Each part is labelled by one of the workload's task labellings (Fashion-MNIST: clothing type,
    garment group). Keys are the true labelling; slot names are "t0", "t1", ... in a random
    order per device, so they tell the aggregator nothing about the task.

    Raises:
        ValueError: The workload has no multi-task split.
    """
    labellings: tuple[str, ...] = capability(workload, "task_labellings")  # type: ignore
    relabel = workload.task_labels  # type: ignore[attr-defined]  (present with the labellings)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(data)), len(labellings))
    slots = rng.permutation(len(labellings))
    return {
        task: LocalTask(f"t{slot}", data.x[np.sort(part)], relabel(task, data.y[np.sort(part)]))
        for task, part, slot in zip(labellings, parts, slots, strict=True)
    }
