"""Global-model settings: Dirichlet skew (FLORA, exact, FedSQ, centralized) and 5×2 incremental.

Fed-TaLoRA (Yu, Hu, Min, arXiv 2505.12318) is simulated as one shared adapter trained through the
whole task sequence (no per-task parameters), the FedEx-style residual calibration after every
aggregation, and the logits of classes outside the current task masked in local training; the
calibration-as-residual reading and the masking are reconstructions (ALGORITHMS.md §1).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.data import INCREMENTAL_TASKS, NUM_CLASSES, Features, class_shares, split
from experiments.federation import Device, GlobalFederation, SimConfig
from experiments.models import (
    build,
    per_class_accuracy,
    predictions,
    sgd_optimiser,
    train_steps,
)
from experiments.report import RunResult

# (row label, model kind, aggregation) of the Dirichlet table
DIRICHLET_METHODS = (
    ("FedAvg (= FLORA aggregation)", "lora", "fedavg"),
    ("Exact (FedEx-LoRA residual)", "lora", "exact"),
    ("FedSQ (LoRA + fixed gating)", "fedsq", "fedavg"),
)
CENTRAL = "Centralized LoRA (upper bound)"
# The continual setting's bound: joint training on every task's pooled data (no sequence).
CENTRAL_JOINT = "Centralized LoRA, all tasks jointly (upper bound)"
# (row label, aggregation, mask logits outside the current task)
INCREMENTAL_METHODS = (
    ("FedAvg", "fedavg", False),
    ("FedAvg + logit mask", "fedavg", True),
    ("Fed-TaLoRA (mask + residual calibration)", "exact", True),
)
INCREMENTAL_ALPHA = 0.5  # label skew inside each 2-class task


def _devices(data: Features, index: np.ndarray, parts: list[np.ndarray]) -> list[Device]:
    return [Device(i, data.subset(index[p]), data.y[index[p]]) for i, p in enumerate(parts)]


def _global_result(
    method: str, model: nn.Module, test: Features, shares: np.ndarray, history: list[float],
    fed: GlobalFederation | None,
) -> RunResult:
    predicted = predictions(model, test)
    per_class = np.nan_to_num(per_class_accuracy(predicted, test.y, test.y, NUM_CLASSES))
    return RunResult(
        method, history, float(np.mean(predicted == test.y)), shares @ per_class,
        float(np.mean(fed.bytes_up)) if fed else 0.0,
        float(np.mean(fed.bytes_down)) if fed else 0.0,
    )


def dirichlet_runs(
    train: Features, test: Features, base: Path, alpha: float, config: SimConfig, seed: int
) -> list[RunResult]:
    """Every Dirichlet(alpha) method on one split, plus centralized LoRA on the pooled data."""
    parts = split(train.y, config.devices, alpha, seed, min_size=config.batch_size)
    devices = _devices(train, np.arange(len(train)), parts)
    shares = np.stack([class_shares(d.labels) for d in devices])
    results = []
    for method, kind, aggregation in DIRICHLET_METHODS:
        fed = GlobalFederation(build(kind, base, seed), config, aggregation)
        rng = np.random.default_rng(seed)  # the same batches for every method
        history = []
        for _ in range(config.rounds):
            fed.round(devices, rng)
            history.append(float(np.mean(predictions(fed.use_global(), test) == test.y)))
        result = _global_result(method, fed.use_global(), test, shares, history, fed)
        results.append(_with_diagnostics(result, fed, test))
    results.append(central_run(devices, test, base, config, seed, shares))
    return results


def _with_diagnostics(result: RunResult, fed: GlobalFederation, test: Features) -> RunResult:
    """Add why a method does (not) differ from FedAvg: residual size, FedSQ gate flips."""
    extra = dict(result.extra)
    if fed.residual_ratio:
        extra["residual_ratio"] = float(np.mean(fed.residual_ratio))
    inner = fed.model.base_model.model
    if hasattr(inner, "gate_disagreement"):
        extra["gate_disagreement"] = inner.gate_disagreement(test.x)
    return replace(result, extra=extra)


def central_run(
    devices: list[Device], test: Features, base: Path, config: SimConfig, seed: int,
    shares: np.ndarray,
) -> RunResult:
    """LoRA on the devices' pooled data; one "round" is as many steps as all devices take in one."""
    pooled = Features(torch.cat([d.data.x for d in devices]),
                      np.concatenate([d.labels for d in devices]))
    model = build("lora", base, seed)
    optimiser = sgd_optimiser(model, config.learning_rate)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(config.rounds):
        train_steps(model, optimiser, pooled, pooled.y, config.local_steps * len(devices),
                    config.batch_size, rng)
        history.append(float(np.mean(predictions(model, test) == test.y)))
    return _global_result(CENTRAL, model, test, shares, history, None)


def incremental_runs(
    train: Features, test: Features, base: Path, config: SimConfig, seed: int
) -> list[RunResult]:
    """Class-incremental 5×2: accuracy over all classes seen so far after each task, forgetting.

    Evaluation is task-agnostic (no task id): predictions range over every class seen so far.
    """
    results = []
    num_tasks = len(INCREMENTAL_TASKS)
    task_devices = _incremental_devices(train, config, seed)
    counts = sum(np.stack([np.bincount(d.labels, minlength=NUM_CLASSES) for d in devices])
                 for devices in task_devices)
    shares = counts / counts.sum(axis=1, keepdims=True)
    for method, aggregation, mask in INCREMENTAL_METHODS:
        fed = GlobalFederation(build("lora", base, seed), config, aggregation)
        rng = np.random.default_rng(seed)
        task_accuracy = np.full((num_tasks, num_tasks), np.nan)  # [after task t, on task j]
        history = []
        for t, (classes, devices) in enumerate(zip(INCREMENTAL_TASKS, task_devices,
                                                    strict=True)):
            allowed = np.array(classes) if mask else None
            for _ in range(config.rounds_per_task):
                fed.round(devices, rng, allowed)
            seen = np.array([c for task in INCREMENTAL_TASKS[: t + 1] for c in task])
            keep = np.isin(test.y, seen)
            subset = test.subset(np.flatnonzero(keep))
            predicted = predictions(fed.use_global(), subset, allowed=seen)
            correct = predicted == subset.y
            for j, task in enumerate(INCREMENTAL_TASKS[: t + 1]):
                task_accuracy[t, j] = float(np.mean(correct[np.isin(subset.y, task)]))
            history.append(float(np.mean(correct)))
        per_class = np.nan_to_num(per_class_accuracy(predicted, subset.y, subset.y, NUM_CLASSES))
        last = num_tasks - 1
        forgetting = np.mean([np.max(task_accuracy[j:last, j]) - task_accuracy[last, j]
                              for j in range(last)])
        results.append(RunResult(
            method, history, history[-1], shares @ per_class,
            float(np.mean(fed.bytes_up)), float(np.mean(fed.bytes_down)),
            {"forgetting": float(forgetting), "average_incremental": float(np.mean(history)),
             # history holds one value per task: count the rounds that reached the best one
             "rounds_to_best_incremental": float((np.argmax(history) + 1)
                                                 * config.rounds_per_task)}
            | ({"residual_ratio": float(np.mean(fed.residual_ratio))}
               if fed.residual_ratio else {}),
        ))
    results.append(joint_central_run(task_devices, test, base, config, seed, shares))
    return results


def _incremental_devices(train: Features, config: SimConfig, seed: int) -> list[list[Device]]:
    """Per task, the devices' shares of that task's classes (Dirichlet α = 0.5 inside a task)."""
    out = []
    for t, classes in enumerate(INCREMENTAL_TASKS):
        pool = np.flatnonzero(np.isin(train.y, classes))
        parts = split(train.y[pool], config.devices, INCREMENTAL_ALPHA, 100 * seed + t,
                      min_size=config.batch_size)
        out.append(_devices(train, pool, parts))
    return out


def joint_central_run(
    task_devices: list[list[Device]], test: Features, base: Path, config: SimConfig, seed: int,
    shares: np.ndarray,
) -> RunResult:
    """LoRA on every task's pooled data at once, as many steps as the federation takes in all.

    The usual upper bound of continual learning: no sequence, so nothing to forget (its
    forgetting and incremental columns do not apply). History: accuracy after each task's share
    of the steps, over all classes.
    """
    pooled = Features(torch.cat([d.data.x for devices in task_devices for d in devices]),
                      np.concatenate([d.labels for devices in task_devices for d in devices]))
    model = build("lora", base, seed)
    optimiser = sgd_optimiser(model, config.learning_rate)
    rng = np.random.default_rng(seed)
    history = []
    for _ in task_devices:
        train_steps(model, optimiser, pooled, pooled.y,
                    config.local_steps * config.devices * config.rounds_per_task,
                    config.batch_size, rng)
        history.append(float(np.mean(predictions(model, test) == test.y)))
    result = _global_result(CENTRAL_JOINT, model, test, shares, history, None)
    best = float((np.argmax(history) + 1) * config.rounds_per_task)  # in round-equivalents
    return replace(result, extra={"rounds_to_best_incremental": best})
