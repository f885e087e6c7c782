"""`edgefl-device`: bad input is one line on stderr and exit code 2, never a trace or a hang."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_client.data import LocalTask
from edge_client.native import EXECUTABLE, write_partition


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXECUTABLE), *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.fixture()
def partition(tmp_path: Path) -> Path:
    return write_partition(tmp_path / "p.safetensors", [LocalTask(
        "", np.zeros((8, 1, 28, 28), np.float32), np.arange(8, dtype=np.int64) % 10)])


def test_bad_input_is_one_line(native_build: Path, cnn_artifacts: Path, partition: Path,
                               tmp_path: Path) -> None:
    text = write_partition(tmp_path / "text.safetensors", [LocalTask(
        "", np.zeros((8, 64), np.int64), np.zeros(8, np.int64))])
    labels = write_partition(tmp_path / "labels.safetensors", [LocalTask(
        "", np.zeros((8, 1, 28, 28), np.float32), np.full(8, 10, np.int64))])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    base = ["--id", "d", "--federation", "f", "--artifacts", str(cnn_artifacts)]
    cases = {
        "unknown option": (["--wat", "1"], "unknown option --wat"),
        "missing value": ([*base, "--data"], "--data needs a value"),
        "missing flag": (base, "missing --data"),
        "bad port": ([*base, "--data", str(partition), "--port", "70000"], "--port must be"),
        "tls half": ([*base, "--data", str(partition), "--cert", "c.pem"], "--cert and --key"),
        "bad id": (["--id", "a/b", *base[2:], "--data", str(partition)], "without / + #"),
        "no artifacts": ([*base[:4], "--artifacts", str(tmp_path), "--data", str(partition)],
                         "no manifest.json"),
        "no data file": ([*base, "--data", str(tmp_path / "none")], "cannot read"),
        "not safetensors": ([*base, "--data", str(tmp_path / "junk.safetensors")],
                            "safetensors"),
        "other model's data": ([*base, "--data", str(text)], "the program takes float32"),
        "label out of range": ([*base, "--data", str(labels)], "has label 10"),
        "missing signing key": ([*base, "--data", str(partition), "--signing-key",
                                 str(tmp_path / "none.key")], "none.key"),
    }
    for name, (args, expected) in cases.items():
        done = _run(*args)
        assert done.returncode == 2, (name, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgefl-device: "), (name, done.stderr)
        assert expected in lines[0], (name, lines[0])


def test_help_lists_every_option(native_build: Path) -> None:
    done = _run("--help")
    assert done.returncode == 0
    for flag in ("--id", "--federation", "--artifacts", "--data", "--host", "--port",
                 "--state-dir", "--seed", "--ca", "--cert", "--key", "--signing-key"):
        assert flag in done.stdout, flag
