"""Helpers the benchmarks share: output, machine description, statistics and workload data."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("fmnist-cnn", "minilm-fortunes")


def quiet() -> None:
    """Keep library logging and warnings off stdout (which carries the JSON) and mostly off stderr.

    Call before the heavy imports. ExecuTorch's cpuinfo lines are printed by C++ and stay.
    """
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    for name in ("torch", "transformers", "peft", "onnxruntime", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")


def executorch_lowering(artifacts: Path) -> str | None:
    """How the artifact's ExecuTorch program was lowered: "xnnpack" (delegated) or "portable"."""
    pte = artifacts / "model.pte"
    if not pte.exists():
        return None
    return "xnnpack" if b"XnnpackBackend" in pte.read_bytes() else "portable"


def artifact_info(artifacts: Path) -> dict[str, Any]:
    """Which exported artifacts a figure was measured on (the folder name carries the input hash)."""
    return {"artifacts": artifacts.name, "executorch_lowering": executorch_lowering(artifacts)}


def emit(result: dict[str, Any], human: str) -> None:
    """Print the result as one JSON object on stdout and a one-line summary on stderr."""
    print(json.dumps(result, sort_keys=False), flush=True)
    print(human, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """CPU model, core count and RAM of this machine."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
            "python": platform.python_version()}


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), in MiB.

    Not getrusage's ru_maxrss: for a child started with fork + exec it never drops below the
    parent's RSS at the fork, and it cannot be reset. VmHWM is this process image's own peak.
    """
    return _status_mib("VmHWM:")


def reset_peak_rss() -> bool:
    """Restart peak-RSS accounting from the current RSS (Linux >= 4.0); False if not possible.

    A child started with fork+exec otherwise inherits its parent's peak in ru_maxrss.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    """Resident set size of this process right now, in MiB."""
    return _status_mib("VmRSS:")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    # Not Linux: ru_maxrss is the best available (KiB on Linux, bytes on macOS).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_data(workload: str, batch: int, count: int, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` real training batches of `workload`, in its model's input format."""
    from workloads.base import private_pool
    from workloads.registry import get_workload_data

    pool = private_pool(get_workload_data(workload))
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        idx = rng.choice(len(pool), size=batch, replace=False)
        batches.append((np.ascontiguousarray(pool.x[idx]), np.ascontiguousarray(pool.y[idx])))
    return batches


def quiet_torch() -> Any:
    """Import torch and silence its loggers (its import resets them), before torchao warns."""
    import torch

    logging.getLogger("torch").setLevel(logging.ERROR)
    return torch


def limit_threads(threads: int) -> None:
    """Run eager PyTorch and ONNX Runtime with `threads` intra-op threads (0: library defaults).

    ExecuTorch's portable kernels are single-threaded. On a shared 2-core machine, PyTorch's and
    ONNX Runtime's spinning thread pools slow down by 10-50x as soon as another process wants a
    core, so the benchmarks default to one thread everywhere. ONNX Runtime's thread count is a
    session option the trainer does not expose; it is injected here by subclassing api.Module.
    """
    torch = quiet_torch()
    import onnxruntime
    from onnxruntime import SessionOptions
    from onnxruntime.training import api

    onnxruntime.set_default_logger_severity(3)  # errors only: its shape-merge warnings are noise
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    if getattr(api.Module, "_bench_threads", None) is not None:
        return
    base = api.Module

    class Module(base):  # type: ignore[misc, valid-type]
        _bench_threads = threads

        def __init__(self, *args: Any, session_options: Any = None, **kwargs: Any) -> None:
            options = session_options or SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            super().__init__(*args, session_options=options, **kwargs)

    api.Module = Module
