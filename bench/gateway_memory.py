"""Idle RSS of a real `edgefl aggregator` process against a bare Python interpreter, same run.

The gateway imports none of torch, onnxruntime or executorch; this measures what it holds once
connected and waiting for updates (target: at most 100 MiB). Both processes run side by side on
this machine, so the ratio, not the absolute figure, is what compares across machines.

    python -m bench.gateway_memory [--artifacts DIR] [--seconds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import artifact_info, emit, machine

TARGET_MIB = 100.0
HEAVY = ("torch", "onnxruntime", "executorch", "sklearn", "scipy")


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(artifacts: Path, settle_s: float) -> dict[str, Any]:
    """Start a broker, an idle aggregator and a bare interpreter; read both RSS figures."""
    from transport.broker import Broker

    status_port = _free_port()
    with Broker(prefer="mosquitto") as broker, tempfile.TemporaryDirectory() as state:
        gateway = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "edgefl", "aggregator",
             "--artifacts", str(artifacts), "--host", broker.host, "--port", str(broker.port),
             "--federation", "bench-rss", "--state-dir", state, "--rounds", "1",
             "--status-port", str(status_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            _wait_healthy(f"http://127.0.0.1:{status_port}/healthz", 60)
            time.sleep(settle_s)
            result = {"gateway_rss_mib": _rss_mib(gateway.pid),
                      "gateway_peak_rss_mib": _rss_mib(gateway.pid, "VmHWM"),
                      "bare_python_rss_mib": _rss_mib(bare.pid)}
        finally:
            for process in (gateway, bare):
                process.terminate()
            _, imports = gateway.communicate(timeout=30)
            bare.wait(timeout=30)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines()
              if line.startswith("import time:")}
    result["heavy_imports"] = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    return result


def main(argv: list[str] | None = None) -> int:
    """Print one JSON object: RSS of the idle gateway, of a bare interpreter, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", help="exported artifact folder (default: the CNN's)")
    parser.add_argument("--seconds", type=float, default=3.0, help="idle time before reading")
    args = parser.parse_args(argv)
    if args.artifacts:
        artifacts = Path(args.artifacts)
    else:
        from export.build import build_artifacts

        artifacts = build_artifacts("fmnist-cnn")
    result = measure(artifacts, args.seconds)
    result.update(
        ratio_to_bare_python=result["gateway_rss_mib"] / result["bare_python_rss_mib"],
        target_mib=TARGET_MIB, within_target=result["gateway_rss_mib"] <= TARGET_MIB,
        machine=machine(), **artifact_info(artifacts))
    emit(result, f"idle gateway {result['gateway_rss_mib']:.1f} MiB "
                 f"({result['ratio_to_bare_python']:.1f}x a bare interpreter), heavy imports: "
                 f"{result['heavy_imports'] or 'none'}")
    return 0 if result["within_target"] and not result["heavy_imports"] else 1


if __name__ == "__main__":
    sys.exit(main())
