"""Bytes per update for each wire encoding, against the fp32 adapter and the full fp32 model."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from bench._common import WORKLOADS, emit, limit_threads, machine, median, quiet, training_data

ENCODINGS = ("fp32", "fp16", "int8", "int8-channel")
TOPK = 0.1


def _update(adapter: dict[str, np.ndarray], is_delta: bool) -> Any:  # protocol.messages.Update
    from protocol.messages import Update

    return Update(federation="bench", round=1, device_id="dev-00000", manifest_sha256="0" * 64,
                  num_samples=1000, update_id="dev-00000-1-bench", adapter=adapter,
                  is_delta=is_delta)


def _rel_error(sent: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    num = sum(float(((got[k] - v) ** 2).sum()) for k, v in sent.items())
    den = sum(float((v**2).sum()) for v in sent.values())
    return float(np.sqrt(num / den)) if den else 0.0


def bench_workload(workload: str, steps: int, repeats: int) -> dict[str, Any]:
    """Train `steps` steps from adapter_init (torch reference), then encode the result every way."""
    from safetensors.numpy import load_file

    from edge_client.trainer import make_trainer
    from export.build import build_artifacts
    from protocol.codec import decode_update, encode_update

    artifacts = build_artifacts(workload)
    trainer = make_trainer("torch", artifacts)
    initial = load_file(str(artifacts / trainer.manifest.files["adapter_init"]))
    trainer.set_adapter(initial)
    for x, y in training_data(workload, trainer.manifest.batch_size, steps):
        trainer.train_step(x, y)
    trained = trainer.get_adapter()
    delta = {k: v - initial[k] for k, v in trained.items()}
    # The full model a non-LoRA federation would ship: every weight except peft's frozen copy of
    # the replaced head, fp32, through the same codec (safetensors + zstd).
    full = {name: p.detach().numpy().astype(np.float32)
            for name, p in trainer.model.named_parameters()
            if "original_module" not in name}

    cases: dict[str, tuple[dict[str, np.ndarray], bool, str, float | None]] = {
        "fp32-adapter": (trained, False, "fp32", None),
        "full-model-fp32": (full, False, "fp32", None),
    }
    for encoding in ENCODINGS:
        cases[f"{encoding}-delta"] = (delta, True, encoding, None)
        cases[f"{encoding}-delta-top{TOPK:g}"] = (delta, True, encoding, TOPK)
    payloads: dict[str, bytes] = {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # timings interleaved; sizes are deterministic
        for name, (tensors, is_delta, encoding, topk) in cases.items():
            started = time.perf_counter()
            payloads[name] = encode_update(_update(tensors, is_delta), encoding, topk)
            times[name].append((time.perf_counter() - started) * 1000)
    adapter_bytes = len(payloads["fp32-adapter"])
    full_bytes = len(payloads["full-model-fp32"])
    rows = {}
    for name, (tensors, _, _, _) in cases.items():
        size = len(payloads[name])
        row: dict[str, Any] = {
            "bytes": size,
            "ratio_vs_fp32_adapter": round(size / adapter_bytes, 4),
            "ratio_vs_full_model": round(size / full_bytes, 6),
            "encode_ms": round(median(times[name]), 3),
        }
        if name != "full-model-fp32":
            decoded = decode_update(payloads[name]).adapter
            row["rel_l2_error"] = round(_rel_error(tensors, decoded), 6)
        rows[name] = row
    return {
        "artifacts": artifacts.name,
        "local_steps": steps,
        "adapter_params": int(sum(v.size for v in trained.values())),
        "full_model_params": int(sum(v.size for v in full.values())),
        "raw_fp32_adapter_bytes": int(sum(v.nbytes for v in trained.values())),
        "raw_fp32_full_model_bytes": int(sum(v.nbytes for v in full.values())),
        "baseline": "fp32-adapter",
        "encodings": rows,
    }


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=20, help="local SGD steps before encoding")
    parser.add_argument("--repeats", type=int, default=5, help="encodings timed per case")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for PyTorch (0: its default)")
    args = parser.parse_args()
    quiet()
    limit_threads(args.threads)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    result: dict[str, Any] = {"benchmark": "update_bytes", "machine": machine(),
                                 "topk": TOPK, "workloads": {}}
    lines = []
    for workload in workloads:
        figures = bench_workload(workload, args.steps, args.repeats)
        result["workloads"][workload] = figures
        enc = figures["encodings"]
        lines.append(f"{workload}: fp32 adapter {enc['fp32-adapter']['bytes']:,} B, "
                     f"int8 delta {enc['int8-delta']['bytes']:,} B, "
                     f"full model {enc['full-model-fp32']['bytes']:,} B")
    emit(result, "bytes per update: " + "; ".join(lines))


if __name__ == "__main__":
    main()
