"""Time and rounds to reach target test accuracy, federation vs centralized, on one workload."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import WORKLOADS, artifact_info, emit, limit_threads, machine, median, quiet

GAP_POINTS = 2.0  # the bar: federated ends within 2 accuracy points of centralized
# MiniLM's accuracy moves by several points from one round to the next (SGD noise at batch 16,
# 400 test quotes), so the gap is also given for the mean of the last TAIL_ROUNDS scores.
TAIL_ROUNDS = 5


@dataclass(frozen=True, slots=True)
class Defaults:
    """A workload's default run of this benchmark (each field has a flag that overrides it)."""

    rounds: int
    local_steps: int
    eval_size: int  # test examples scored after every round, on both sides
    targets: tuple[float, ...]
    devices: int = 6
    alpha: float = 0.5
    learning_rate: float | None = None  # both sides' SGD lr (None: the workload's demo lr)


# fmnist-cnn: the configuration of docs/BENCHMARKS.md section 5 (6 x 20 x 6 = 720 steps of 32,
# lr 0.05). minilm-fortunes: 6 x 8 x 20 = 960 steps of 16 at lr 0.1, about 6 minutes per side
# on 2 idle cores (a MiniLM step takes ~0.35 s). FedAvg over 6 devices with K local steps moves
# the adapter about as far per round as K centralized steps, not 6K, so at the demo's lr (0.05)
# and 480 steps the federation was still far from converged (7.75 points behind); at lr 0.1 and
# 960 steps both sides have levelled off (docs/BENCHMARKS.md section 6). lr 0.3 diverges.
DEFAULTS = {
    "fmnist-cnn": Defaults(rounds=6, local_steps=20, eval_size=2000, targets=(0.75, 0.80)),
    "minilm-fortunes": Defaults(rounds=20, local_steps=8, eval_size=400,
                                targets=(0.75, 0.80, 0.83), learning_rate=0.1),
}


def reached(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """First point of `curve` (after the start) whose accuracy is at least `target`."""
    return next(({"round": p["round"], "seconds": round(p["seconds"], 2)}
                 for p in curve[1:] if p["accuracy"] >= target), None)


def federation(workload: str, devices: int, backends: tuple[str, ...], rounds: int,
               local_steps: int, learning_rate: float, alpha: float, eval_size: int,
               verbose: bool) -> dict[str, Any]:
    """One run of edgefl.demo.run_federation (Mosquitto, real coordinator, emulated fleet)."""
    from rich.console import Console

    from edge_client.fleet import FleetConfig
    from edgefl.demo import FederationConfig, run_federation

    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        config = FederationConfig(
            fleet=FleetConfig(devices=devices, backends=backends, alpha=alpha),
            rounds=rounds, local_steps=local_steps, learning_rate=learning_rate,
            eval_size=eval_size, workload=workload, out_dir=Path(tmp))
        started = time.monotonic()
        result = run_federation(config, Console(stderr=True, quiet=not verbose))
        wall = time.monotonic() - started
    curve = [{"round": r.round, "accuracy": r.accuracy, "seconds": r.seconds,
              "devices": r.devices} for r in result.rows]
    return {"wall_s": wall, "curve": curve, "broker": result.broker}


def centralized(artifacts: Path, steps_per_round: list[int], learning_rate: float,
                eval_size: int, seed: int) -> dict[str, Any]:
    """Torch reference trainer, same LoRA and initial adapter, on the pooled private data.

    Runs as many SGD steps as the federation ran in each round (devices x local steps), with
    the artifacts' batch size, and scores the adapter after each such block, on the same test
    examples, with the same evaluator (ONNX Runtime) as the federation.
    """
    from safetensors.numpy import load_file

    from edge_client.trainer import evaluate_dataset, make_trainer, train_local
    from workloads.base import private_pool
    from workloads.registry import get_workload_data

    trainer = make_trainer("torch", artifacts, learning_rate)
    evaluator = make_trainer("onnxruntime", artifacts)  # what the federation scores with
    initial = load_file(str(artifacts / trainer.manifest.files["adapter_init"]))
    trainer.set_adapter(initial)
    data = get_workload_data(trainer.manifest.workload)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with unset ones filled from the workload's row of DEFAULTS."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=WORKLOADS, default="fmnist-cnn")
    parser.add_argument("--devices", type=int, help="default: 6")
    parser.add_argument("--backends", default="executorch,onnxruntime")
    parser.add_argument("--rounds", type=int, help="default: the workload's (DEFAULTS)")
    parser.add_argument("--local-steps", type=int, help="default: the workload's (DEFAULTS)")
    parser.add_argument("--alpha", type=float, help="Dirichlet non-IID skew (default: 0.5)")
    parser.add_argument("--targets", help="comma-separated accuracies (default: the workload's)")
    parser.add_argument("--eval-size", type=int,
                        help="test examples scored (default: CNN 2000, MiniLM 400)")
    parser.add_argument("--learning-rate", type=float,
                        help="both sides' SGD learning rate (default: CNN 0.05, MiniLM 0.1)")
    parser.add_argument("--repeats", type=int, default=3, help="(baseline, federation) pairs")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for PyTorch and ONNX Runtime (0: their defaults)")
    parser.add_argument("--verbose", action="store_true", help="show the federation's progress")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.workload]
    for name in ("devices", "rounds", "local_steps", "alpha", "eval_size", "learning_rate"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    args.targets = ([float(t) for t in args.targets.split(",") if t] if args.targets
                    else list(defaults.targets))
    if min(args.devices, args.rounds, args.local_steps, args.eval_size, args.repeats) <= 0:
        parser.error("--devices, --rounds, --local-steps, --eval-size and --repeats must be > 0")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error("--learning-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run federation and baseline interleaved, print JSON."""
    args = parse_args(argv)
    quiet()
    limit_threads(args.threads)
    from export.build import build_artifacts
    from protocol.manifest import load_manifest
    from workloads.registry import get_workload_data

    data = get_workload_data(args.workload)
    # the same lr on both sides: the federation's devices get it through FederationConfig
    learning_rate = (data.demo.learning_rate if args.learning_rate is None else args.learning_rate)
    # The federation's devices run the programs run_federation builds: build_artifacts(workload)
    # with the workload's batch size. The baseline trains on the very same export.
    artifacts = build_artifacts(args.workload)
    batch = load_manifest(artifacts).batch_size
    if batch != data.batch_size:
        raise SystemExit(f"artifacts batch {batch} != workload batch {data.batch_size}")
    backends = tuple(b for b in args.backends.split(",") if b)
    steps_per_round = [args.devices * args.local_steps] * args.rounds  # participation 1.0
    feds, cens = [], []
    for i in range(args.repeats):
        cens.append(centralized(artifacts, steps_per_round, learning_rate, args.eval_size,
                                seed=i))
        feds.append(federation(args.workload, args.devices, backends, args.rounds,
                               args.local_steps, learning_rate, args.alpha, args.eval_size,
                               args.verbose))

    fed, cen = summarize(feds, args.targets), summarize(cens, args.targets)
    ratios = {}
    for t in fed["to_target"]:
        f_s, c_s = fed["to_target"][t]["seconds_median"], cen["to_target"][t]["seconds_median"]
        ratios[t] = round(f_s / c_s, 2) if f_s and c_s else None
    # pair i is (centralized run i, federation run i), run back to back
    gap = accuracy_gap(cens, feds, final_accuracy)
    tail_gap = accuracy_gap(cens, feds, tail_accuracy)
    result = {
        "benchmark": "time_to_accuracy", "workload": args.workload, "machine": machine(),
        "threads": args.threads or "library defaults",
        "config": {"devices": args.devices, "backends": list(backends), "rounds": args.rounds,
                   "local_steps": args.local_steps, "alpha": args.alpha,
                   "batch_size": batch, "learning_rate": learning_rate,
                   "eval_size": args.eval_size, "repeats": args.repeats,
                   "total_sgd_steps": sum(steps_per_round), "broker": feds[0]["broker"],
                   **artifact_info(artifacts)},
        "baseline": "centralized",
        "federation": fed, "centralized": cen, "time_ratio_vs_centralized": ratios,
        "final_accuracy_gap_points": gap,
        "tail_accuracy_gap_points": {"rounds": min(TAIL_ROUNDS, args.rounds), **tail_gap},
    }
    emit(result, f"{args.workload} time to accuracy: " + "; ".join(
        f">= {t}: federation {fed['to_target'][t]['seconds_median']} s "
        f"(round {fed['to_target'][t]['round_median']}), "
        f"centralized {cen['to_target'][t]['seconds_median']} s" for t in fed["to_target"])
        + f"; final accuracy gap (centralized - federation) {gap['median']} points "
        f"(last {min(TAIL_ROUNDS, args.rounds)} rounds' mean: {tail_gap['median']})")


def final_accuracy(run: dict[str, Any]) -> float:
    """Accuracy at the last round."""
    return run["curve"][-1]["accuracy"]


def tail_accuracy(run: dict[str, Any]) -> float:
    """Mean accuracy over the last TAIL_ROUNDS rounds (all rounds if fewer), round 0 excluded."""
    return float(np.mean([p["accuracy"] for p in run["curve"][1:][-TAIL_ROUNDS:]]))


def accuracy_gap(cens: list[dict[str, Any]], feds: list[dict[str, Any]], measure: Any
                 ) -> dict[str, Any]:
    """Centralized minus federation, in accuracy points, per (baseline, federation) pair."""
    runs = [round(100 * (measure(c) - measure(f)), 2) for c, f in zip(cens, feds, strict=True)]
    gap = round(median(runs), 2)
    return {"median": gap, "runs": runs, "within_points": GAP_POINTS, "within": gap <= GAP_POINTS}


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
        "final_accuracy": [round(final_accuracy(r), 4) for r in runs],
        "final_accuracy_median": round(median([final_accuracy(r) for r in runs]), 4),
        "tail_accuracy": [round(tail_accuracy(r), 4) for r in runs],
        "to_target": to_target,
        "curves": [[{k: round(v, 4) for k, v in p.items()} for p in r["curve"]] for r in runs],
    }


if __name__ == "__main__":
    main()
