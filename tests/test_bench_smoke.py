"""The fast benchmarks run end to end with small arguments and print well-formed JSON.

No timing thresholds: the figures depend on the machine. What is checked is what cannot depend
on it: the documented keys, figures that must equal each other or a size computable from the
artifacts and the wire format, and bounds that follow from how each encoding is defined.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

REPO_ROOT = Path(__file__).resolve().parent.parent
DENSE = ("fp32", "fp16", "int8", "int8-channel")  # bench/update_bytes.py ENCODINGS, TOPK = 0.1


def run_bench(module: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run `python -m bench.<module> args...` and parse the one JSON object it prints."""
    out = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out.stdout[:500]!r}"
    result = json.loads(lines[0])
    assert result["benchmark"] == module
    assert set(result["machine"]) == {"cpu", "cores", "ram_gib", "python"}
    assert isinstance(result["machine"]["cores"], int) and result["machine"]["cores"] >= 1
    return result


def initial_adapter(artifacts: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from protocol.manifest import load_manifest

    return load_file(str(artifacts / load_manifest(artifacts).files["adapter_init"]))


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def zstd_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND: the most bytes zstd can turn `size` bytes into (zstd.h)."""
    return size + (size >> 8) + ((128 * 1024 - size) >> 11 if size < 128 * 1024 else 0)


def uncompressed_update_size(shapes: dict[str, tuple[int, ...]], encoding: str,
                             topk: float | None, is_delta: bool) -> int:
    """Bytes of an update's safetensors body before zstd, for tensors of these shapes.

    The layout (tensor sizes, dtypes, header) depends only on the shapes, the encoding and the
    number of kept entries, never on the values: an all-zero delta gives the same size.
    """
    from protocol.codec import encode_update
    from protocol.messages import Update

    zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    update = Update(federation="bench", round=1, device_id="dev-00000", manifest_sha256="0" * 64,
                    num_samples=1000, update_id="dev-00000-1-bench", adapter=zeros,
                    is_delta=is_delta)
    return len(zstandard.ZstdDecompressor().decompress(encode_update(update, encoding, topk)))


def test_update_bytes_orders_encodings(cnn_artifacts: Path) -> None:
    result = run_bench("update_bytes", "--workload", "fmnist-cnn", "--steps", "3",
                       "--repeats", "1")
    assert set(result) == {"benchmark", "machine", "topk", "workloads"} and result["topk"] == 0.1
    figures = result["workloads"]["fmnist-cnn"]
    assert set(figures) == {"artifacts", "local_steps", "adapter_params", "full_model_params",
                            "raw_fp32_adapter_bytes", "raw_fp32_full_model_bytes", "baseline",
                            "encodings"}
    assert figures["artifacts"] == cnn_artifacts.name and figures["local_steps"] == 3
    assert figures["baseline"] == "fp32-adapter"

    # Parameter counts and raw sizes: the adapter's from adapter_init, 4 bytes per fp32 entry.
    shapes = {k: v.shape for k, v in initial_adapter(cnn_artifacts).items()}
    params = sum(math.prod(s) for s in shapes.values())
    assert figures["adapter_params"] == params
    assert figures["raw_fp32_adapter_bytes"] == 4 * params
    assert figures["raw_fp32_full_model_bytes"] == 4 * figures["full_model_params"]
    assert params < figures["full_model_params"]

    enc = figures["encodings"]
    assert set(enc) == {"fp32-adapter", "full-model-fp32"} | {
        f"{e}-delta{tail}" for e in DENSE for tail in ("", "-top0.1")}
    adapter_bytes, full_bytes = enc["fp32-adapter"]["bytes"], enc["full-model-fp32"]["bytes"]
    for name, row in enc.items():
        keys = {"bytes", "ratio_vs_fp32_adapter", "ratio_vs_full_model", "encode_ms"}
        assert set(row) == (keys if name == "full-model-fp32" else keys | {"rel_l2_error"}), name
        assert isinstance(row["bytes"], int) and row["bytes"] > 0, name
        # the ratios are these rows' own byte counts divided, rounded as documented in the script
        assert row["ratio_vs_fp32_adapter"] == round(row["bytes"] / adapter_bytes, 4), name
        assert row["ratio_vs_full_model"] == round(row["bytes"] / full_bytes, 6), name
        assert positive(row["encode_ms"]), name

    # Sizes: zstd never produces more than ZSTD_COMPRESSBOUND of the uncompressed body, whose
    # size follows from the shapes and the encoding alone.
    cases = [("fp32-adapter", "fp32", None, False)]
    cases += [(f"{e}-delta", e, None, True) for e in DENSE]
    cases += [(f"{e}-delta-top0.1", e, 0.1, True) for e in DENSE]
    for name, encoding, topk, is_delta in cases:
        bound = zstd_bound(uncompressed_update_size(shapes, encoding, topk, is_delta))
        assert enc[name]["bytes"] <= bound, (name, enc[name]["bytes"], bound)
    assert full_bytes <= zstd_bound(figures["raw_fp32_full_model_bytes"] + 8192)  # + header
    assert enc["int8-delta"]["bytes"] < enc["fp16-delta"]["bytes"] < enc["fp32-delta"]["bytes"]
    assert adapter_bytes < full_bytes

    # Errors: fp32 is lossless. fp16 rounds each entry to 11 significant bits, a relative error
    # of at most 2^-11 ≈ 4.9e-4 (ignoring subnormals). Top-10% keeps the largest-magnitude tenth,
    # so the dropped part has at most 90% of the squared norm: error ≤ sqrt(0.9) ≈ 0.949.
    err = {name: row["rel_l2_error"] for name, row in enc.items() if "rel_l2_error" in row}
    assert err["fp32-adapter"] == 0.0 and err["fp32-delta"] == 0.0
    assert err["fp16-delta"] < 1e-3
    assert err["int8-delta"] < 0.05 and err["int8-channel-delta"] < 0.05  # empirical
    dropped = err["fp32-delta-top0.1"]
    assert 0 < dropped <= math.sqrt(0.9)
    # A lossy encoding of the kept entries only adds error on coordinates disjoint from the
    # dropped ones: err² ≥ dropped². fp16 and per-tensor int8 round the kept entries exactly as
    # the dense encoding does (same max, so same scale): err² ≤ dropped² + dense err².
    for e in ("fp16", "int8", "int8-channel"):
        assert err[f"{e}-delta-top0.1"] >= dropped - 1e-5, e
    for e in ("fp16", "int8"):
        assert err[f"{e}-delta-top0.1"] ** 2 <= dropped**2 + err[f"{e}-delta"] ** 2 + 1e-5, e


def test_ingest_small_fleet(cnn_artifacts: Path) -> None:
    from bench.ingest import make_payloads

    result = run_bench("ingest", "--workload", "fmnist-cnn", "--updates", "20", "--repeats", "1",
                       "--memory-n", "20", "--strategies", "fedavg,fedmedian")
    assert set(result) == {"benchmark", "machine", "workload", "encoding", "rate", "memory"}
    assert result["workload"] == "fmnist-cnn" and result["encoding"] == "fp32"

    rate = result["rate"]
    assert set(rate) == {"updates", "repeats", "payload_bytes", "baseline", "raw_msgs_per_s",
                         "aggregator_updates_per_s", "ratio_vs_raw", "raw_runs",
                         "aggregator_runs", "raw_cpu_us_per_msg", "aggregator_cpu_us_per_update"}
    assert positive(rate["raw_cpu_us_per_msg"]) and positive(rate["aggregator_cpu_us_per_update"])
    assert rate["baseline"] == "raw-subscriber" and (rate["updates"], rate["repeats"]) == (20, 1)
    assert len(rate["raw_runs"]) == len(rate["aggregator_runs"]) == 1
    # one repeat: the medians are the runs, and the ratio is their quotient (rates rounded to 0.1)
    assert rate["raw_msgs_per_s"] == rate["raw_runs"][0]
    assert rate["aggregator_updates_per_s"] == rate["aggregator_runs"][0]
    assert positive(rate["raw_msgs_per_s"]) and positive(rate["aggregator_updates_per_s"])
    assert positive(rate["ratio_vs_raw"])
    assert math.isclose(rate["ratio_vs_raw"], rate["aggregator_runs"][0] / rate["raw_runs"][0],
                        rel_tol=0.02)
    # The payloads are repeat 0's: 20 fp32 updates from seed 0. Only the random federation name
    # and update ids (same lengths) differ from these, which moves the zstd size by a few bytes.
    sizes = [len(p) for _, p in make_payloads(cnn_artifacts, "bench-00000000", 20, seed=0)]
    assert abs(rate["payload_bytes"] - int(np.median(sizes))) <= 32, (rate["payload_bytes"], sizes)

    memory = result["memory"]
    assert set(memory) == {"adapter_fp32_mib", "n_times_adapter_mib", "paced_updates_per_s",
                           "strategies"}
    adapter_mib = sum(v.nbytes for v in initial_adapter(cnn_artifacts).values()) / 2**20
    assert memory["adapter_fp32_mib"] == round(adapter_mib, 3)
    assert memory["n_times_adapter_mib"] == {"20": round(20 * adapter_mib, 1)}
    # paced runs send at --pace-fraction (0.5) of the measured aggregator rate
    assert abs(memory["paced_updates_per_s"] - 0.5 * rate["aggregator_updates_per_s"]) <= 0.15
    assert set(memory["strategies"]) == {"fedavg", "fedmedian"}
    for strategy, per_n in memory["strategies"].items():
        assert set(per_n) == {"20"} and set(per_n["20"]) == {"burst", "paced"}, strategy
        for mode, row in per_n["20"].items():
            assert set(row) == {"peak_growth_mib", "max_inbox_messages", "updates_per_s"}
            assert positive(row["updates_per_s"]), (strategy, mode)
            # 20 adapters are 20 × 0.03 MiB; half a GiB would mean far more than the round held
            assert 0 <= row["peak_growth_mib"] < 512, (strategy, mode, row)
            # the inbox can only ever hold the 20 published updates
            assert isinstance(row["max_inbox_messages"], int)
            assert 0 <= row["max_inbox_messages"] <= 20, (strategy, mode, row)


def test_ingest_workers(cnn_artifacts: Path) -> None:
    """--workers runs the real `edgefl aggregator --workers W` (a leader and W worker processes)
    paired with raw runs: every run must accept every update, and the figures be its runs'."""
    result = run_bench("ingest", "--workload", "fmnist-cnn", "--updates", "40", "--repeats", "1",
                       "--memory-n", "", "--workers", "2", timeout=300)
    assert set(result) == {"benchmark", "machine", "workload", "encoding", "rate", "memory",
                           "workers"}
    assert set(result["workers"]) == {"2"}
    row = result["workers"]["2"]
    assert set(row) == {"processes", "raw_msgs_per_s", "aggregator_updates_per_s",
                        "ratio_vs_raw", "raw_runs", "aggregator_runs", "ratio_runs",
                        "accepted_runs", "raw_cpu_us_per_msg", "aggregator_cpu_us_per_update",
                        "aggregator_cpu_runs"}
    assert row["processes"] == 3 and row["accepted_runs"] == [40]  # leader + 2, all accepted
    # one repeat: the medians are the runs, and the ratio is their quotient
    assert len(row["raw_runs"]) == len(row["aggregator_runs"]) == len(row["ratio_runs"]) == 1
    assert row["raw_msgs_per_s"] == row["raw_runs"][0]
    assert row["aggregator_updates_per_s"] == row["aggregator_runs"][0]
    assert positive(row["raw_msgs_per_s"]) and positive(row["aggregator_updates_per_s"])
    assert row["ratio_vs_raw"] == row["ratio_runs"][0]
    assert math.isclose(row["ratio_vs_raw"], row["aggregator_runs"][0] / row["raw_runs"][0],
                        rel_tol=0.02)
    assert positive(row["raw_cpu_us_per_msg"]) and positive(row["aggregator_cpu_us_per_update"])
    assert row["aggregator_cpu_runs"] == [row["aggregator_cpu_us_per_update"]]


def test_step_time_cnn(cnn_artifacts: Path) -> None:
    from protocol.manifest import load_manifest

    result = run_bench("step_time", "--workload", "fmnist-cnn", "--steps", "2", "--warmup", "1")
    assert set(result) == {"benchmark", "machine", "threads", "workloads"}
    assert result["threads"] == 1
    figures = result["workloads"]["fmnist-cnn"]
    assert set(figures) == {"artifacts", "executorch_lowering", "batch", "steps", "warmup",
                            "baseline", "backends"}
    assert figures["artifacts"] == cnn_artifacts.name
    assert figures["executorch_lowering"] in ("xnnpack", "portable")
    assert figures["batch"] == load_manifest(cnn_artifacts).batch_size
    assert (figures["steps"], figures["warmup"], figures["baseline"]) == (2, 1, "eager")
    assert set(figures["backends"]) == {"eager", "executorch", "onnxruntime", "torch"}
    for name, row in figures["backends"].items():
        assert set(row) == {"median_ms", "min_ms", "max_ms", "ratio_vs_eager"}, name
        assert positive(row["min_ms"]) and positive(row["ratio_vs_eager"]), name
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"], name
    # eager's per-step ratio to itself is t / t = 1 at every step
    assert figures["backends"]["eager"]["ratio_vs_eager"] == 1.0


def check_time_to_accuracy(result: dict[str, Any], workload: str, devices: int, rounds: int,
                           local_steps: int, eval_size: int, targets: list[str]) -> None:
    """What a time_to_accuracy result must hold whatever the machine and the accuracies."""
    from bench.time_to_accuracy import DEFAULTS
    from workloads.registry import get_workload_data

    data = get_workload_data(workload)
    assert set(result) == {"benchmark", "workload", "machine", "threads", "config", "baseline",
                           "federation", "centralized", "time_ratio_vs_centralized",
                           "final_accuracy_gap_points", "tail_accuracy_gap_points"}
    assert result["workload"] == workload and result["baseline"] == "centralized"
    config = result["config"]
    assert (config["devices"], config["rounds"], config["local_steps"]) == (devices, rounds,
                                                                            local_steps)
    assert config["eval_size"] == eval_size and config["repeats"] == 1
    # both sides train with the workload's batch size and the benchmark's default learning rate
    assert config["batch_size"] == data.batch_size
    assert config["learning_rate"] == (DEFAULTS[workload].learning_rate
                                       or data.demo.learning_rate)
    assert config["total_sgd_steps"] == devices * local_steps * rounds
    assert config["artifacts"].startswith(f"{workload}-b{data.batch_size}-")
    for side in ("federation", "centralized"):
        figures = result[side]
        assert set(figures) == {"wall_s_median", "final_accuracy", "final_accuracy_median",
                                "tail_accuracy", "to_target", "curves"}, side
        assert positive(figures["wall_s_median"]), side
        (curve,) = figures["curves"]
        assert [p["round"] for p in curve] == list(range(rounds + 1)), side
        assert all(0 <= p["accuracy"] <= 1 for p in curve), side
        # both start from adapter_init, scored by the same evaluator on the same test examples
        assert curve[0]["accuracy"] == result["federation"]["curves"][0][0]["accuracy"], side
        assert figures["final_accuracy"] == [figures["final_accuracy_median"]]
        assert figures["final_accuracy"][0] == round(curve[-1]["accuracy"], 4), side
        tail = np.mean([p["accuracy"] for p in curve[1:][-5:]])  # TAIL_ROUNDS = 5
        assert abs(figures["tail_accuracy"][0] - tail) <= 1e-4, side
        assert set(figures["to_target"]) == set(targets), side
    steps = [p["steps"] for p in result["centralized"]["curves"][0]]
    assert steps == [i * devices * local_steps for i in range(rounds + 1)]
    assert all(p["devices"] == devices for p in result["federation"]["curves"][0][1:])

    # centralized minus federation, in points; one pair, so the median is that pair's gap
    tail_gap = result["tail_accuracy_gap_points"]
    assert tail_gap.pop("rounds") == min(5, rounds)
    gaps = {"final_accuracy": result["final_accuracy_gap_points"], "tail_accuracy": tail_gap}
    for key, gap in gaps.items():
        assert set(gap) == {"median", "runs", "within_points", "within"}, key
        expected = 100 * (result["centralized"][key][0] - result["federation"][key][0])
        assert gap["runs"] == [gap["median"]] and abs(gap["median"] - expected) <= 0.011, key
        assert gap["within_points"] == 2.0 and gap["within"] == (gap["median"] <= 2.0), key
    for target, ratio in result["time_ratio_vs_centralized"].items():
        fed = result["federation"]["to_target"][target]["seconds_median"]
        cen = result["centralized"]["to_target"][target]["seconds_median"]
        assert ratio == (round(fed / cen, 2) if fed and cen else None), target


def test_time_to_accuracy_defaults_per_workload() -> None:
    from bench.time_to_accuracy import DEFAULTS, parse_args

    cnn = parse_args([])  # the default workload keeps section 5's configuration
    assert cnn.workload == "fmnist-cnn"
    assert (cnn.devices, cnn.rounds, cnn.local_steps, cnn.alpha, cnn.eval_size) == (6, 6, 20,
                                                                                    0.5, 2000)
    assert cnn.targets == [0.75, 0.80] and cnn.learning_rate is None
    minilm = parse_args(["--workload", "minilm-fortunes"])
    row = DEFAULTS["minilm-fortunes"]
    assert (minilm.devices, minilm.alpha, minilm.learning_rate) == (6, 0.5, row.learning_rate)
    assert (minilm.rounds, minilm.local_steps, minilm.eval_size) == (row.rounds, row.local_steps,
                                                                     row.eval_size)
    assert minilm.targets == list(row.targets)
    flags = parse_args(["--workload", "minilm-fortunes", "--rounds", "3", "--local-steps", "2",
                        "--eval-size", "32", "--targets", "0.5", "--devices", "4",
                        "--learning-rate", "0.05"])
    assert (flags.rounds, flags.local_steps, flags.eval_size, flags.devices) == (3, 2, 32, 4)
    assert flags.targets == [0.5] and flags.learning_rate == 0.05


def test_time_to_accuracy_cnn(cnn_artifacts: Path) -> None:
    result = run_bench("time_to_accuracy", "--devices", "2", "--rounds", "2", "--local-steps",
                       "3", "--eval-size", "64", "--repeats", "1", "--targets", "0.2,0.99")
    check_time_to_accuracy(result, "fmnist-cnn", 2, 2, 3, 64, ["0.20", "0.99"])
    assert result["config"]["artifacts"] == cnn_artifacts.name


def test_time_to_accuracy_minilm_tiny() -> None:
    """--workload minilm-fortunes end to end: its own artifacts, data, batch and lr, 2 devices."""
    result = run_bench("time_to_accuracy", "--workload", "minilm-fortunes", "--devices", "2",
                       "--rounds", "1", "--local-steps", "1", "--eval-size", "16", "--repeats",
                       "1", "--targets", "0.5", timeout=600)
    check_time_to_accuracy(result, "minilm-fortunes", 2, 1, 1, 16, ["0.50"])


def test_native_device_bench(cnn_artifacts: Path, native_build: Path) -> None:
    result = run_bench("native_device", "--workload", "fmnist-cnn", "--blocks", "1",
                       "--repeats", "1", timeout=300)
    assert result["workload"] == "fmnist-cnn" and result["batch_size"] == 32
    for kind in ("native", "python"):
        assert result[f"{kind}_step_s"] > 0 and len(result["peaks_mib"][kind]) == 1
    assert math.isclose(result["step_ratio"], result["native_step_s"] / result["python_step_s"])
    assert math.isclose(result["rss_ratio"],
                        result["native_peak_rss_mib"] / result["python_peak_rss_mib"])
