"""Peak RSS of each backend (load + N training steps) against a process that only imports."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import (
    WORKLOADS,
    artifact_info,
    current_rss_mib,
    emit,
    limit_threads,
    machine,
    median,
    peak_rss_mib,
    quiet,
    quiet_torch,
    reset_peak_rss,
    training_data,
)

BACKENDS = ("executorch", "onnxruntime", "torch")
BASELINE = "imports-only"
DEFAULT_STEPS = {"fmnist-cnn": 10, "minilm-fortunes": 2}


def child(backend: str, artifacts: Path, steps: int, threads: int, batches: Path
          ) -> dict[str, float]:
    """Body of one fresh process: import every backend's libraries and the data, then maybe train.

    Every process, the baseline included, imports the same libraries and loads the same batches
    (prepared by the parent, so reading the whole dataset never sets the peak), so the
    difference to the baseline is what loading the program and training cost.
    """
    reset_peak_rss()  # VmHWM of this process image only
    quiet()
    limit_threads(threads)  # imports torch and onnxruntime
    import executorch.extension.training  # noqa: F401
    import onnxruntime.training.api  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from edge_client.trainer import make_trainer

    with np.load(batches) as saved:
        data = list(zip(saved["x"], saved["y"]))
    after_imports = current_rss_mib()
    if backend != BASELINE:
        trainer = make_trainer(backend, artifacts)
        for i in range(steps):
            trainer.train_step(*data[i % len(data)])
    return {"peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": after_imports,
            "rss_end_mib": current_rss_mib()}


def measure(backend: str, artifacts: Path, steps: int, threads: int, batches: Path
            ) -> dict[str, float]:
    """Run `child` in a fresh interpreter and return what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", backend, "--artifacts", str(artifacts),
         "--steps", str(steps), "--threads", str(threads), "--batches", str(batches)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_workload(workload: str, backends: tuple[str, ...], steps: int, repeats: int,
                   threads: int) -> dict[str, Any]:
    """Median peak RSS per backend and the baseline, processes interleaved over `repeats`."""
    quiet_torch()  # build_artifacts imports it
    from export.build import build_artifacts
    from protocol.manifest import load_manifest

    # Resolved once here: every child opens the very same files, even if the sources change.
    artifacts = build_artifacts(workload)
    data = training_data(workload, load_manifest(artifacts).batch_size, max(steps, 1))
    peaks: dict[str, list[float]] = {name: [] for name in (BASELINE, *backends)}
    imports: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        batches = Path(tmp) / "batches.npz"
        np.savez(batches, x=np.stack([x for x, _ in data]), y=np.stack([y for _, y in data]))
        for _ in range(repeats):
            for name in peaks:
                figures = measure(name, artifacts, steps, threads, batches)
                peaks[name].append(figures["peak_rss_mib"])
                imports.append(figures["rss_after_imports_mib"])
    base = median(peaks[BASELINE])
    return {
        **artifact_info(artifacts),
        "steps": steps, "repeats": repeats, "baseline": BASELINE,
        "baseline_peak_rss_mib": round(base, 1),
        "rss_after_imports_mib": round(median(imports), 1),
        "backends": {
            name: {"peak_rss_mib": round(median(ps), 1),
                   "over_baseline_mib": round(median(ps) - base, 1),
                   "ratio_vs_baseline": round(median(ps) / base, 3),
                   "runs_mib": [round(p, 1) for p in ps]}
            for name, ps in peaks.items() if name != BASELINE
        },
    }


def main() -> None:
    """Parse arguments, run (or be a child), print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per process (default: 10 CNN, 2 MiniLM)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per backend")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for PyTorch and ONNX Runtime (0: their defaults)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.artifacts, args.steps, args.threads, args.batches)))
        return
    quiet()
    backends = tuple(b for b in args.backends.split(",") if b)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    result: dict[str, Any] = {"benchmark": "memory", "machine": machine(),
                                 "threads": args.threads or "library defaults", "workloads": {}}
    lines = []
    for workload in workloads:
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[workload]
        figures = bench_workload(workload, backends, steps, args.repeats, args.threads)
        result["workloads"][workload] = figures
        over = ", ".join(f"{name} +{b['over_baseline_mib']:.0f} MiB"
                         for name, b in figures["backends"].items())
        lines.append(f"{workload}: baseline {figures['baseline_peak_rss_mib']:.0f} MiB, {over}")
    emit(result, "peak RSS over an imports-only process: " + "; ".join(lines))


if __name__ == "__main__":
    main()
