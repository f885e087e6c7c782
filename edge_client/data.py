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


def multitask_tasks(workload: WorkloadData, index: int, num_devices: int, alpha: float,
                    seed: int, slot_seed: int) -> dict[str, LocalTask]:
    """Device `index`'s local tasks (FL-TAC's setting), keyed by the true task.

    The data comes from the workload (Fashion-MNIST: disjoint parts of the device's share, one
    per labelling; fortunes: a share of each task's own quotes). Slot names are "t0", "t1", ...
    in an order drawn from `slot_seed` (per device), so they tell the aggregator nothing.

    Raises:
        ValueError: The workload has no multi-task split.
    """
    tasks: tuple[str, ...] = capability(workload, "task_labellings")  # type: ignore[assignment]
    shares = workload.local_tasks(index, num_devices, alpha, seed)  # type: ignore[attr-defined]
    slots = np.random.default_rng(slot_seed).permutation(len(tasks))
    return {task: LocalTask(f"t{slot}", shares[task].x, shares[task].y)
            for task, slot in zip(tasks, slots, strict=True)}
