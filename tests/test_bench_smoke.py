"""The fast benchmarks run end to end with small arguments and print well-formed JSON.

No timing thresholds: the figures depend on the machine; only their shape and sanity are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run `python -m bench.<module> args...` and parse the one JSON object it prints."""
    out = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out.stdout[:500]!r}"
    result = json.loads(lines[0])
    assert result["benchmark"] == module
    assert result["machine"]["cores"] >= 1
    return result


def test_update_bytes_orders_encodings(cnn_artifacts: Path) -> None:
    result = run_bench("update_bytes", "--workload", "fmnist-cnn", "--steps", "3",
                       "--repeats", "1")
    figures = result["workloads"]["fmnist-cnn"]
    enc = figures["encodings"]
    assert figures["baseline"] == "fp32-adapter"
    assert enc["fp32-adapter"]["ratio_vs_fp32_adapter"] == 1.0
    assert enc["int8-delta"]["bytes"] < enc["fp16-delta"]["bytes"] < enc["fp32-delta"]["bytes"]
    assert enc["fp32-adapter"]["bytes"] < enc["full-model-fp32"]["bytes"]
    for name, row in enc.items():
        assert row["bytes"] > 0 and row["ratio_vs_fp32_adapter"] > 0, name
        assert row["ratio_vs_full_model"] > 0, name
        if name.startswith(("fp32-", "fp16-", "int8-")) and "top" not in name:
            assert row["rel_l2_error"] < 0.05, name  # dense encodings are near-lossless
    assert figures["adapter_params"] < figures["full_model_params"]


def test_ingest_small_fleet(cnn_artifacts: Path) -> None:
    result = run_bench("ingest", "--workload", "fmnist-cnn", "--updates", "20", "--repeats", "1",
                       "--memory-n", "20", "--strategies", "fedavg,fedmedian")
    rate = result["rate"]
    assert rate["baseline"] == "raw-subscriber"
    assert rate["raw_msgs_per_s"] > 0 and rate["aggregator_updates_per_s"] > 0
    assert rate["ratio_vs_raw"] > 0 and rate["payload_bytes"] > 0
    memory = result["memory"]
    assert memory["adapter_fp32_mib"] > 0
    for strategy in ("fedavg", "fedmedian"):
        for mode in ("burst", "paced"):
            row = memory["strategies"][strategy]["20"][mode]
            assert row["peak_growth_mib"] >= 0 and row["updates_per_s"] > 0
            assert row["max_inbox_messages"] >= 0


def test_step_time_cnn(cnn_artifacts: Path) -> None:
    result = run_bench("step_time", "--workload", "fmnist-cnn", "--steps", "2", "--warmup", "1")
    figures = result["workloads"]["fmnist-cnn"]
    assert figures["baseline"] == "eager" and figures["batch"] == 32
    assert set(figures["backends"]) == {"eager", "executorch", "onnxruntime", "torch"}
    for name, row in figures["backends"].items():
        assert row["median_ms"] > 0 and row["ratio_vs_eager"] > 0, name
    assert figures["backends"]["eager"]["ratio_vs_eager"] == 1.0
