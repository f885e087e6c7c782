"""`python -m experiments --out docs/RESULTS.md [--quick]`: run every setting, write the tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from experiments.document import render
from experiments.report import extract_section, summary, with_section
from experiments.runner import FULL, QUICK, run_all
from workloads.cnn import FmnistCnn


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every setting, and write the Markdown (and optionally JSON)."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 minute run with tiny sizes (for tests), one seed")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the per-method summary numbers as JSON here")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    command = "python -m experiments --out " + str(args.out) + (" --quick" if args.quick else "")
    # Small matrices: one thread is as fast, and does not fight other work on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_all(config, FmnistCnn().base_weights(),
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The text federations' section (python -m experiments.text) is kept as it was.
    kept = extract_section(args.out.read_text()) if args.out.exists() else ""
    args.out.write_text(with_section(render(results, config, command), kept))
    if args.json is not None:
        digest = {name: summary(runs) for name, runs in results.runs.items()}
        args.json.write_text(json.dumps(digest, indent=1, sort_keys=True))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
