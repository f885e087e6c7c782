"""Training step time of each backend against eager PyTorch, interleaved step by step."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from bench._common import (
    WORKLOADS,
    artifact_info,
    emit,
    limit_threads,
    machine,
    median,
    quiet,
    training_data,
)

BACKENDS = ("executorch", "onnxruntime", "torch")
DEFAULT_STEPS = {"fmnist-cnn": 30, "minilm-fortunes": 5}


class EagerBaseline:
    """Plain eager PyTorch: the workload's peft model and torch.optim.SGD, no trainer wrapper."""

    def __init__(self, workload_name: str, learning_rate: float) -> None:
        import torch

        from workloads.registry import get_workload

        workload = get_workload(workload_name)
        self.model = workload.build(workload.base_weights(), seed=0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=learning_rate)

    def train_step(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        """One forward/backward/SGD step."""
        import torch

        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(torch.from_numpy(inputs)),
                                                 torch.from_numpy(labels))
        loss.backward()
        self.optimizer.step()


def bench_workload(workload: str, backends: tuple[str, ...], steps: int, warmup: int
                   ) -> dict[str, Any]:
    """Median ms/step per backend and its per-step ratio to eager, all measured interleaved."""
    from edge_client.trainer import DEFAULT_LEARNING_RATE, make_trainer
    from export.build import build_artifacts
    from protocol.manifest import load_manifest

    artifacts = build_artifacts(workload)
    runners: dict[str, Any] = {"eager": EagerBaseline(workload, DEFAULT_LEARNING_RATE)}
    runners |= {b: make_trainer(b, artifacts) for b in backends}
    batch = load_manifest(artifacts).batch_size
    data = training_data(workload, batch, warmup + steps)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i, (x, y) in enumerate(data):
        # Rotate the order every step so no backend always runs right after the same one.
        for name in names[i % len(names):] + names[: i % len(names)]:
            started = time.perf_counter()
            runners[name].train_step(x, y)
            elapsed = time.perf_counter() - started
            if i >= warmup:
                times[name].append(elapsed * 1000)
    eager = times["eager"]
    return {
        **artifact_info(artifacts),
        "batch": batch, "steps": steps, "warmup": warmup, "baseline": "eager",
        "backends": {
            name: {
                "median_ms": round(median(ts), 3),
                "min_ms": round(min(ts), 3),
                "max_ms": round(max(ts), 3),
                # Paired per step (same batch, same moment), so machine load cancels out.
                "ratio_vs_eager": round(median([t / e for t, e in zip(ts, eager)]), 3),
            }
            for name, ts in times.items()
        },
    }


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per backend (default: 30 CNN, 5 MiniLM)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backend")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for PyTorch and ONNX Runtime (0: their defaults)")
    args = parser.parse_args()
    quiet()
    limit_threads(args.threads)
    backends = tuple(b for b in args.backends.split(",") if b)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    result: dict[str, Any] = {"benchmark": "step_time", "machine": machine(),
                                 "threads": args.threads or "library defaults", "workloads": {}}
    lines = []
    for workload in workloads:
        steps = args.steps or DEFAULT_STEPS[workload]
        figures = bench_workload(workload, backends, steps, args.warmup)
        result["workloads"][workload] = figures
        lines.append(workload + ": " + ", ".join(
            f"{name} {b['median_ms']:.1f} ms ({b['ratio_vs_eager']:.2f}x)"
            for name, b in figures["backends"].items()))
    emit(result, "step time, median ms/step (ratio vs eager): " + "; ".join(lines))


if __name__ == "__main__":
    main()
