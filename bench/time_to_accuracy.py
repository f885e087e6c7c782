"""Time and rounds to reach target test accuracy on Fashion-MNIST: federation vs centralized."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import artifact_info, emit, limit_threads, machine, median, quiet


def reached(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """First point of `curve` (after the start) whose accuracy is at least `target`."""
    return next(({"round": p["round"], "seconds": round(p["seconds"], 2)}
                 for p in curve[1:] if p["accuracy"] >= target), None)


def federation(devices: int, backends: tuple[str, ...], rounds: int, local_steps: int,
               alpha: float, eval_size: int, verbose: bool) -> dict[str, Any]:
    """One run of edgefl.demo.run_federation (Mosquitto, real coordinator, emulated fleet)."""
    from rich.console import Console

    from edge_client.fleet import FleetConfig
    from edgefl.demo import FederationConfig, run_federation

    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        config = FederationConfig(
            fleet=FleetConfig(devices=devices, backends=backends, alpha=alpha),
            rounds=rounds, local_steps=local_steps, eval_size=eval_size, out_dir=Path(tmp))
        started = time.monotonic()
        result = run_federation(config, Console(stderr=True, quiet=not verbose))
        wall = time.monotonic() - started
    curve = [{"round": r.round, "accuracy": r.accuracy, "seconds": r.seconds,
              "devices": r.devices} for r in result.rows]
    return {"wall_s": wall, "curve": curve, "broker": result.broker}


def centralized(steps_per_round: list[int], learning_rate: float, eval_size: int, seed: int
                ) -> dict[str, Any]:
    """Torch reference trainer, same LoRA and initial adapter, on the pooled private data.

    Runs as many SGD steps as the federation ran in each round (devices x local steps) and
    scores the adapter after each such block, on the same test images, with the same evaluator.
    """
    from safetensors.numpy import load_file

    from edge_client.trainer import evaluate_dataset, make_trainer, train_local
    from export.build import build_artifacts
    from workloads.base import private_pool
    from workloads.registry import get_workload_data

    artifacts = build_artifacts("fmnist-cnn")
    trainer = make_trainer("torch", artifacts, learning_rate)
    evaluator = make_trainer("onnxruntime", artifacts)  # what the federation scores with
    initial = load_file(str(artifacts / trainer.manifest.files["adapter_init"]))
    trainer.set_adapter(initial)
    data = get_workload_data("fmnist-cnn")
    private, test = private_pool(data), data.test_data(eval_size)
    rng = np.random.default_rng(seed)

    def score() -> float:
        evaluator.set_adapter(trainer.get_adapter())
        return evaluate_dataset(evaluator, test.x, test.y)[1]

    curve = [{"round": 0, "accuracy": score(), "seconds": 0.0, "steps": 0}]
    started, total = time.monotonic(), 0
    for i, steps in enumerate(steps_per_round, start=1):
        train_local(trainer, private.x, private.y, steps, rng)
        total += steps
        curve.append({"round": i, "accuracy": score(), "seconds": time.monotonic() - started,
                      "steps": total})
    return {"wall_s": time.monotonic() - started, "curve": curve, "artifacts": artifacts}


def main() -> None:
    """Parse arguments, run federation and baseline interleaved, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--backends", default="executorch,onnxruntime")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID skew")
    parser.add_argument("--targets", default="0.75,0.80")
    parser.add_argument("--eval-size", type=int, default=2000, help="test images scored")
    parser.add_argument("--repeats", type=int, default=3, help="(baseline, federation) pairs")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for PyTorch and ONNX Runtime (0: their defaults)")
    parser.add_argument("--verbose", action="store_true", help="show the federation's progress")
    args = parser.parse_args()
    quiet()
    limit_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    backends = tuple(b for b in args.backends.split(",") if b)
    steps_per_round = [args.devices * args.local_steps] * args.rounds  # participation 1.0
    feds, cens = [], []
    for i in range(args.repeats):
        cens.append(centralized(steps_per_round, 0.05, args.eval_size, seed=i))
        feds.append(federation(args.devices, backends, args.rounds, args.local_steps, args.alpha,
                               args.eval_size, args.verbose))

    fed, cen = summarize(feds, targets), summarize(cens, targets)
    ratios = {}
    for t in fed["to_target"]:
        f_s, c_s = fed["to_target"][t]["seconds_median"], cen["to_target"][t]["seconds_median"]
        ratios[t] = round(f_s / c_s, 2) if f_s and c_s else None
    result = {
        "benchmark": "time_to_accuracy", "machine": machine(),
        "threads": args.threads or "library defaults",
        "config": {"devices": args.devices, "backends": list(backends), "rounds": args.rounds,
                   "local_steps": args.local_steps, "alpha": args.alpha,
                   "eval_size": args.eval_size, "repeats": args.repeats,
                   "total_sgd_steps": sum(steps_per_round), "broker": feds[0]["broker"],
                   **artifact_info(cens[-1]["artifacts"])},
        "baseline": "centralized",
        "federation": fed, "centralized": cen, "time_ratio_vs_centralized": ratios,
    }
    emit(result, "time to accuracy: " + "; ".join(
        f">= {t}: federation {fed['to_target'][t]['seconds_median']} s "
        f"(round {fed['to_target'][t]['round_median']}), "
        f"centralized {cen['to_target'][t]['seconds_median']} s" for t in fed["to_target"]))


def summarize(runs: list[dict[str, Any]], targets: list[float]) -> dict[str, Any]:
    """Median wall time, and median round and seconds at which each target was first reached."""
    to_target = {}
    for target in targets:
        hits = [h for h in (reached(r["curve"], target) for r in runs) if h is not None]
        to_target[f"{target:.2f}"] = {
            "reached_runs": len(hits),
            "round_median": median([h["round"] for h in hits]) if hits else None,
            "seconds_median": median([h["seconds"] for h in hits]) if hits else None,
        }
    return {
        "wall_s_median": round(median([r["wall_s"] for r in runs]), 2),
        "final_accuracy": [round(r["curve"][-1]["accuracy"], 4) for r in runs],
        "to_target": to_target,
        "curves": [[{k: round(v, 4) for k, v in p.items()} for p in r["curve"]] for r in runs],
    }


if __name__ == "__main__":
    main()
