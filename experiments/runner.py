"""Run every setting of the results: Dirichlet α ∈ {0.1, 0.5}, class-incremental, multi-task."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from experiments.data import load_features
from experiments.federation import SimConfig
from experiments.multitask import multitask_runs
from experiments.report import RunResult
from experiments.settings import dirichlet_runs, incremental_runs

ALPHAS = (0.1, 0.5)
DATA_SEED = 0  # one fixed slice of the data; seeds vary the splits, initial adapters and batches

FULL = SimConfig()
QUICK = SimConfig(devices=4, rounds=3, local_steps=5, train_examples=3000, test_examples=2000,
                  rounds_per_task=2, seeds=(0,))


@dataclass(frozen=True, slots=True)
class Results:
    """Runs per setting name, and the wall time each setting took."""

    runs: dict[str, list[RunResult]]
    seconds: dict[str, float]
    torch_threads: int


def dirichlet_setting(alpha: float) -> str:
    """The setting name of one Dirichlet α."""
    return f"dirichlet-{alpha}"


def run_all(config: SimConfig, base: Path, progress: Callable[[str], None] = lambda _: None
            ) -> Results:
    """Every setting for every seed of `config`, in a fixed order (reproducible on CPU)."""
    start = time.perf_counter()
    train, test = load_features(base, config.train_examples, config.test_examples, DATA_SEED)
    seconds = {"features": time.perf_counter() - start}
    jobs: list[tuple[str, Callable[[int], list[RunResult]]]] = [
        (dirichlet_setting(a), lambda s, a=a: dirichlet_runs(train, test, base, a, config, s))
        for a in ALPHAS
    ]
    jobs.append(("incremental", lambda s: incremental_runs(train, test, base, config, s)))
    jobs.append(("multitask", lambda s: multitask_runs(train, test, base, config, s)))
    runs: dict[str, list[RunResult]] = {}
    for name, job in jobs:
        start = time.perf_counter()
        runs[name] = [replace(run, seed=seed) for seed in config.seeds for run in job(seed)]
        seconds[name] = time.perf_counter() - start
        progress(f"{name}: {seconds[name]:.1f} s")
    return Results(runs, seconds, torch.get_num_threads())
