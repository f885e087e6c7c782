"""Multi-task setting: two labellings of Fashion-MNIST; FedAvg vs FL-TAC vs CoLoRA.

Half of the devices learn the clothing type (10 classes), the other half the garment group
(4 classes, experiments.data.GROUP_OF_CLASS) of different images; the labellings conflict, so one
shared model must compromise. FL-TAC (Ping et al., arXiv 2404.15384) clusters the submitted
adapters into K = 2 groups without being told the task; CoLoRA (Magakyan et al., arXiv
2602.07218) shares A, B and the head and keeps an r×r core per device (optionally the head too,
a deviation). Each device is scored with the model it would use: the global one for FedAvg, its
slot's cluster average for FL-TAC, the shared tensors plus its own personal ones for CoLoRA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aggregator.clustering import cluster_agreement, fltac
from aggregator.personal import colora, is_personal, shared_part
from aggregator.strategies import fedavg
from experiments.data import MULTI_TASKS, NUM_CLASSES, Features, class_shares, split, task_labels
from experiments.federation import Device, SimConfig
from experiments.models import (
    adapter_nbytes,
    build,
    per_class_accuracy,
    predictions,
    sgd_optimiser,
    train_steps,
)
from experiments.report import RunResult
from protocol.tensors import TensorDict
from workloads.lora import get_adapter, set_adapter

MULTITASK_ALPHA = 0.5  # label skew inside each task, as FL-TAC's setup
# row label -> (model kind, method, personal segments for CoLoRA)
MULTITASK_METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "FedAvg (one shared adapter)": ("lora", "fedavg", ()),
    "FL-TAC (K = 2 clusters)": ("lora", "fltac", ()),
    "CoLoRA (personal r×r cores)": ("colora", "colora", ("lora_S",)),
    "CoLoRA + personal head": ("colora", "colora", ("lora_S", "head")),
    # Upper bound: one LoRA model per task, trained on that task's pooled data.
    "Centralized LoRA per task (upper bound)": ("lora", "central", ()),
}
TASK_CLASSES = {"type": None, "group": np.arange(4)}  # the logits each task may use


def multitask_devices(
    train: Features, config: SimConfig, seed: int
) -> tuple[list[Device], list[str]]:
    """Devices split between the tasks (disjoint halves of the data), Dirichlet inside a task."""
    halves = np.array_split(np.random.default_rng(seed).permutation(len(train)), len(MULTI_TASKS))
    devices, tasks = [], []
    for k, (task, pool) in enumerate(zip(MULTI_TASKS, halves, strict=True)):
        count = config.devices // len(MULTI_TASKS) + (k < config.devices % len(MULTI_TASKS))
        for p in split(train.y[pool], count, MULTITASK_ALPHA, 10 * seed + k, config.batch_size):
            index = np.sort(pool[p])
            data = train.subset(index)
            devices.append(Device(len(devices), data, task_labels(task, data.y)))
            tasks.append(task)
    return devices, tasks


def _device_accuracy(
    predicted: np.ndarray, test: Features, task: str, shares: np.ndarray
) -> float:
    """Accuracy on the device's task, weighted by its shares of the original classes."""
    per_class = per_class_accuracy(predicted, task_labels(task, test.y), test.y, NUM_CLASSES)
    return float(shares @ np.nan_to_num(per_class))


def multitask_run(
    method: str, train: Features, test: Features, base: Path, config: SimConfig, seed: int
) -> RunResult:
    """One method of the multi-task table (every device takes part in every round)."""
    kind, rule, personal = MULTITASK_METHODS[method]
    devices, tasks = multitask_devices(train, config, seed)
    shares = [class_shares(d.data.y) for d in devices]
    if rule == "central":
        return _central_run(method, devices, tasks, shares, test, base, config, seed)
    model = build(kind, base, seed)
    optimiser = sgd_optimiser(model, config.learning_rate)
    start = get_adapter(model)
    # what each device loads at the start of a round (FL-TAC: its slot; CoLoRA: + personal part)
    state: list[TensorDict] = [dict(start) for _ in devices]
    rng = np.random.default_rng(seed)
    history, up, down, agreement = [], [], [], 0.0
    for round_index in range(config.rounds):
        updates = []
        for device, task in zip(devices, tasks, strict=True):
            set_adapter(model, state[device.index])
            train_steps(model, optimiser, device.data, device.labels, config.local_steps,
                        config.batch_size, rng, TASK_CLASSES[task])
            updates.append((get_adapter(model), float(len(device.labels))))
        if rule == "fedavg":
            new = fedavg(updates)
            state = [new for _ in devices]
            sent = [new for _ in devices]
        elif rule == "fltac":
            clustering = fltac(updates, len(MULTI_TASKS), seed=1000 * seed + round_index)
            state = sent = clustering.adapters
            agreement = cluster_agreement(clustering.labels, np.array(tasks))
        else:
            shared = colora(updates, personal)
            state = [shared | {k: v for k, v in u.items() if is_personal(k, personal)}
                     for u, _ in updates]
            sent = [shared for _ in devices]
        up.append(sum(adapter_nbytes(shared_part(u, personal)) for u, _ in updates))
        down.append(sum(adapter_nbytes(s) for s in sent))
        accuracies = []
        predicted: dict[tuple[int, str], np.ndarray] = {}  # FedAvg/FL-TAC slots share adapters
        for device, task in zip(devices, tasks, strict=True):
            key = (id(state[device.index]), task)
            if key not in predicted:
                set_adapter(model, state[device.index])
                predicted[key] = predictions(model, test, TASK_CLASSES[task])
            accuracies.append(_device_accuracy(predicted[key], test, task, shares[device.index]))
        history.append(float(np.mean(accuracies)))
    by_task = {f"acc_{task}": float(np.mean([a for a, t in zip(accuracies, tasks, strict=True)
                                             if t == task])) for task in MULTI_TASKS}
    extra = by_task | ({"cluster_agreement": agreement} if rule == "fltac" else {})
    return RunResult(method, history, history[-1], np.array(accuracies),
                     float(np.mean(up)), float(np.mean(down)), extra)


def _central_run(
    method: str, devices: list[Device], tasks: list[str], shares: list[np.ndarray],
    test: Features, base: Path, config: SimConfig, seed: int,
) -> RunResult:
    """Per task, LoRA on its devices' pooled data (a round: as many steps as they take in one)."""
    models, optimisers, pools = {}, {}, {}
    for task in MULTI_TASKS:
        mine = [d for d, t in zip(devices, tasks, strict=True) if t == task]
        pools[task] = (Features(torch.cat([d.data.x for d in mine]),
                                np.concatenate([d.labels for d in mine])), len(mine))
        models[task] = build("lora", base, seed)
        optimisers[task] = sgd_optimiser(models[task], config.learning_rate)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    for _ in range(config.rounds):
        predicted = {}
        for task in MULTI_TASKS:
            pooled, count = pools[task]
            train_steps(models[task], optimisers[task], pooled, pooled.y,
                        config.local_steps * count, config.batch_size, rng, TASK_CLASSES[task])
            predicted[task] = predictions(models[task], test, TASK_CLASSES[task])
        accuracies = [_device_accuracy(predicted[t], test, t, shares[d.index])
                      for d, t in zip(devices, tasks, strict=True)]
        history.append(float(np.mean(accuracies)))
    by_task = {f"acc_{task}": float(np.mean([a for a, t in zip(accuracies, tasks, strict=True)
                                             if t == task])) for task in MULTI_TASKS}
    return RunResult(method, history, history[-1], np.array(accuracies), 0.0, 0.0, by_task)


def multitask_runs(
    train: Features, test: Features, base: Path, config: SimConfig, seed: int
) -> list[RunResult]:
    """Every method of the multi-task table on one seed."""
    return [multitask_run(m, train, test, base, config, seed) for m in MULTITASK_METHODS]
