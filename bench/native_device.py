"""Native C++ device vs the Python ExecuTorch device: step time and peak RSS, in one run.

Step time: the same batches through the native trainer (C API, via ctypes) and the Python
ExecuTorch backend in one process, in interleaved blocks; the ratio is native / Python.
Peak RSS: each device as the process a user runs (`edgefl-device`, `edgefl client --backend
executorch`) through a one-round federation over Mosquitto; VmHWM polled from /proc while it runs.

    .venv/bin/python -m bench.native_device [--workload fmnist-cnn,minilm-fortunes]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import WORKLOADS, artifact_info, emit, machine, median, quiet, quiet_torch

REPO = Path(__file__).resolve().parents[1]
STEPS = {"fmnist-cnn": 20, "minilm-fortunes": 4}  # per timed block
LOCAL_STEPS = {"fmnist-cnn": 20, "minilm-fortunes": 4}  # the RSS federation's round


def step_times(artifacts: Path, workload: str, blocks: int) -> dict[str, Any]:
    """Median seconds per training step of each trainer over interleaved blocks."""
    from bench._common import training_data
    from edge_client.backends.executorch_backend import ExecuTorchTrainer
    from edge_client.native import check, library
    from protocol.manifest import load_manifest

    manifest = load_manifest(artifacts)
    batches = training_data(workload, manifest.batch_size, STEPS[workload])
    lib = library()
    native = lib.edgefl_trainer_create(str(artifacts).encode(), 0.05)
    if not native:
        raise SystemExit(f"native trainer: {lib.edgefl_last_error().decode()}")
    python = ExecuTorchTrainer(artifacts, manifest, 0.05)
    loss = ctypes.c_float()

    def run_native() -> None:
        for x, y in batches:
            check(lib.edgefl_trainer_step(native, x.ctypes.data, x.nbytes, y.ctypes.data,
                                          ctypes.byref(loss)))

    def run_python() -> None:
        for x, y in batches:
            python.train_step(x, y)

    times: dict[str, list[float]] = {"native": [], "python": []}
    run_native(), run_python()  # warm-up: first runs size the thread pool and caches
    for _ in range(blocks):
        for name, body in (("native", run_native), ("python", run_python)):
            started = time.perf_counter()
            body()
            times[name].append((time.perf_counter() - started) / len(batches))
    lib.edgefl_trainer_destroy(native)
    native_s, python_s = median(times["native"]), median(times["python"])
    return {"native_step_s": native_s, "python_step_s": python_s,
            "step_ratio": native_s / python_s, "blocks": blocks, "steps_per_block": len(batches)}


def _watch_peak(process: subprocess.Popen[bytes], peak: list[float]) -> None:
    """Poll the process's VmHWM (its own high-water mark) until it exits."""
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            break
        time.sleep(0.02)


def device_peak_rss(kind: str, artifacts: Path, workload: str, folder: Path) -> float:
    """Peak RSS (MiB) of one device process serving a one-round federation."""
    from safetensors.numpy import load_file

    from aggregator.coordinator import AggregatorConfig, Coordinator
    from aggregator.store import GlobalStore
    from edge_client.data import LocalTask
    from edge_client.native import EXECUTABLE, write_partition
    from protocol.manifest import load_manifest
    from protocol.messages import TrainConfig
    from transport.broker import Broker
    from transport.mqtt import MqttTransport
    from workloads.registry import get_workload_data

    manifest = load_manifest(artifacts)
    federation = f"rss-{kind}"
    with Broker(prefer="mosquitto") as broker:
        transport = MqttTransport(broker.host, broker.port, "aggregator",
                                  persistent_session=True, manual_ack=True)
        transport.start()
        config = AggregatorConfig(federation=federation, rounds=1, clients_per_round=1,
                                  min_clients=1, round_deadline_s=600,
                                  train=TrainConfig(local_steps=LOCAL_STEPS[workload]))
        coordinator = Coordinator(config, manifest,
                                  load_file(str(artifacts / manifest.files["adapter_init"])),
                                  transport, GlobalStore(folder / kind / "aggregator"))
        common = ["--federation", federation, "--artifacts", str(artifacts), "--port",
                  str(broker.port), "--state-dir", str(folder / kind)]
        if kind == "native":
            share = get_workload_data(workload).device_data(0, 6, 0.5, 0)
            partition = write_partition(folder / "part.safetensors",
                                        [LocalTask("", share.x, share.y)])
            command = [str(EXECUTABLE), "--id", "dev-0", "--data", str(partition), *common]
        else:
            command = [sys.executable, "-m", "edgefl", "client", "--workload", workload,
                       "--device-id", "dev-0", "--index", "0", "--num-devices", "6",
                       "--backend", "executorch", *common]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        peak = [0.0]
        watcher = threading.Thread(target=_watch_peak, args=(process, peak), daemon=True)
        watcher.start()
        try:
            coordinator.run()
            process.wait(120)
        finally:
            process.kill()
            transport.stop()
        watcher.join(5)
        if process.returncode != 0:
            raise SystemExit(f"the {kind} device failed (exit {process.returncode})")
    return peak[0]


def main() -> None:
    """Measure each workload and print one JSON object per workload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default=",".join(WORKLOADS))
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per trainer")
    parser.add_argument("--repeats", type=int, default=2, help="device processes per kind")
    parser.add_argument("--batch-sizes", default="",
                        help="comma-separated batch sizes to export and compare (default: each "
                             "workload's own)")
    args = parser.parse_args()
    quiet()
    quiet_torch()
    from edge_client.native import build_native
    from edge_client.native_logs import native_stderr_silenced
    from export.build import build_artifacts

    build_native()
    sizes = [int(b) for b in args.batch_sizes.split(",") if b] or [None]
    for workload, batch_size in [(w, b) for w in args.workload.split(",") for b in sizes]:
        with native_stderr_silenced():
            artifacts = build_artifacts(workload, batch_size=batch_size)
        times = step_times(artifacts, workload, args.blocks)
        peaks: dict[str, list[float]] = {"native": [], "python": []}
        with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
            for r in range(args.repeats):  # interleaved, so drift hits both kinds alike
                for kind in ("native", "python"):
                    peaks[kind].append(device_peak_rss(kind, artifacts, workload,
                                                       Path(tmp) / str(r)))
        native_mib, python_mib = median(peaks["native"]), median(peaks["python"])
        from protocol.manifest import load_manifest

        batch = load_manifest(artifacts).batch_size
        result = {"benchmark": "native_device", "workload": workload, "batch_size": batch, **times,
                  "native_peak_rss_mib": native_mib, "python_peak_rss_mib": python_mib,
                  "rss_ratio": native_mib / python_mib, "peaks_mib": peaks,
                  **artifact_info(artifacts), "machine": machine()}
        emit(result, f"{workload} (batch {batch}): native step {times['native_step_s'] * 1e3:.1f} ms vs "
                     f"Python ExecuTorch {times['python_step_s'] * 1e3:.1f} ms "
                     f"({times['step_ratio']:.2f}x); peak RSS {native_mib:.0f} vs "
                     f"{python_mib:.0f} MiB ({native_mib / python_mib:.2f}x)")


if __name__ == "__main__":
    main()
