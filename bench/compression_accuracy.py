"""Accuracy and bytes of compact update encodings on the demo federation, against fp32.

Runs the same federation (same devices, data split and seeds) once per encoding, plus fp32 a
second time to show the run-to-run noise, and prints one JSON object: final accuracy, the
accuracy change against fp32 in points, and the mean bytes of one update and its ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console

from edge_client.fleet import FleetConfig
from edgefl.demo import FederationConfig, run_federation

ENCODINGS = ("fp32", "fp16", "int8", "int8-channel")
INT8_BUDGET_PT = 0.5  # the issue's bound on int8's accuracy loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--backends", default="executorch,onnxruntime")
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--out", default="runs/bench-compression")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - tables go to the JSON only
    fleet = FleetConfig(devices=args.devices, backends=tuple(args.backends.split(",")))
    runs: dict[str, dict[str, float]] = {}
    for name in [*args.encodings.split(","), "fp32-repeat"]:
        encoding = "fp32" if name == "fp32-repeat" else name
        result = run_federation(FederationConfig(
            fleet=fleet, rounds=args.rounds, local_steps=args.local_steps,
            update_encoding=encoding, out_dir=Path(args.out)), console=quiet)
        rows = result.rows[1:]
        runs[name] = {
            "final_accuracy": result.rows[-1].accuracy,
            "bytes_per_update": sum(r.bytes_up for r in rows) / sum(r.devices for r in rows),
        }
        print(f"{name}: accuracy {runs[name]['final_accuracy']:.4f}, "
              f"{runs[name]['bytes_per_update']:.0f} B/update", file=sys.stderr)
    base = runs["fp32"]
    for run in runs.values():
        run["accuracy_change_pt"] = 100 * (run["final_accuracy"] - base["final_accuracy"])
        run["bytes_ratio_vs_fp32"] = run["bytes_per_update"] / base["bytes_per_update"]
    report = {"benchmark": "compression_accuracy", "baseline": "fp32", "config": vars(args),
              "runs": runs, "int8_budget_pt": INT8_BUDGET_PT,
              "int8_within_budget": runs.get("int8", base)["accuracy_change_pt"] >= -INT8_BUDGET_PT}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
