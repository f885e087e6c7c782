"""`edgefl demo` shows only its own lines: no runtime's native prints, no library warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the libraries print when left alone: ONNX Runtime's graph warnings, ExecuTorch's cpuinfo
# lines (both C++ on fd 2), torch's pytree deprecation (torchao's import), any Python warning.
NOISE = ("[W:onnxruntime", "graph.cc", "MergeShapeInfo", "cpuinfo", "_pytree.py",
         "register_constant", "torchao", "Warning:", "Traceback")


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p in line for p in NOISE)]


@pytest.mark.slow
def test_the_demo_prints_only_its_own_lines(tmp_path: Path) -> None:
    # A first run: an empty cache, so the demo exports (ONNX Runtime's artifact generation
    # logs its graph passes from C++) before it trains
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "demo", "--devices", "2", "--rounds", "1",
         "--local-steps", "2", "--workload", "fmnist-cnn", "--out", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=os.environ | {"EDGEFL_CACHE": str(tmp_path / "cache")},
    )
    assert (tmp_path / "cache" / "artifacts").is_dir()  # it did export
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accuracy rose" in proc.stdout
    assert not _noise(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert not proc.stderr.strip(), proc.stderr


# Loads both runtimes' programs of the MiniLM export, whose graphs make ONNX Runtime warn.
_LOAD = """
import sys
from edge_client.trainer import make_trainer
from export.build import build_artifacts
folder = build_artifacts("minilm-fortunes", batch_size=4)
make_trainer("onnxruntime", folder)
make_trainer("executorch", folder)
print("loaded", file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [True, False])
def test_the_quiet_switch_is_what_silences_the_native_prints(quiet: bool) -> None:
    # Not vacuous: with the switch off, the same loads do print the native lines.
    env = os.environ | {"EDGEFL_QUIET_NATIVE": "1" if quiet else "0"}
    proc = subprocess.run([sys.executable, "-c", _LOAD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rstrip().endswith("loaded")  # fd 2 was given back after the first load
    native = [line for line in proc.stderr.splitlines()
              if "[W:onnxruntime" in line or "cpuinfo" in line]
    assert (not native) if quiet else (any("onnxruntime" in n for n in native)
                                       and any("cpuinfo" in n for n in native)), native
