"""Bad input to `edgefl aggregator` is one clear line on stderr and a non-zero exit, never a
traceback, and nothing is written before the error."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _aggregator(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefl", "aggregator", "--federation", "f", "--port", "1",
         "--state-dir", str(state), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefl: ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_taken_status_port_is_one_line_before_any_state(cnn_artifacts: Path,
                                                          tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _aggregator("--artifacts", str(cnn_artifacts), "--status-port", str(port),
                           "--allowed-devices", "a", state=tmp_path / "state")
    _one_line_error(proc, f"127.0.0.1:{port}")
    assert not (tmp_path / "state").exists()


def test_a_missing_artifact_folder_is_one_line(tmp_path: Path) -> None:
    proc = _aggregator("--artifacts", str(tmp_path / "nowhere"), state=tmp_path / "state")
    _one_line_error(proc, "manifest.json")


def test_a_combination_that_would_break_is_one_line(cnn_artifacts: Path, tmp_path: Path) -> None:
    proc = _aggregator("--artifacts", str(cnn_artifacts), "--strategy", "trimmed_mean",
                       "--min-clients", "2", state=tmp_path / "state")
    _one_line_error(proc, "trims nothing")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("options", "words"), [
    (["--workers", "-1"], "--workers must be 0"),
    (["--workers", "2", "--upstream", "g1"], "--workers and --upstream do not go together"),
    (["--upstream", "g1", "--merge-gateways", "g1,g2"], "do not go together"),
    (["--upstream", "a/b"], "--upstream: gateway id 'a/b'"),
    (["--upstream", "g1,g2"], "--upstream takes this gateway's one id"),
    (["--merge-gateways", "g1,g1"], "distinct gateway ids"),
    (["--merge-gateways", ","], "--merge-gateways names no gateway"),
    (["--workers", "2", "--mode", "async"], "merges synchronous rounds"),
    (["--worker-kind", "native"], "--worker-kind native needs --workers N"),
    (["--workers", "2", "--worker-kind", "native", "--clip-norm", "1"], "does not clip updates"),
    (["--workers", "2", "--worker-kind", "native", "--strategy", "fedmedian"],
     "fedmedian needs every update of a round"),
])
def test_bad_scale_out_options_are_one_line(options: list[str], words: str, cnn_artifacts: Path,
                                            tmp_path: Path) -> None:
    proc = _aggregator("--artifacts", str(cnn_artifacts), *options, state=tmp_path / "state")
    _one_line_error(proc, words)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("options", "words"), [
    (["--aggregator-worker-kind", "native"],
     "--aggregator-worker-kind native needs --aggregator-workers N"),
    (["--aggregator-workers", "2", "--aggregator-worker-kind", "native", "--mode", "async"],
     "merges synchronous rounds"),
])
def test_bad_fleet_scale_out_options_are_one_line(options: list[str], words: str,
                                                  tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--devices", "4", "--rounds", "1",
         "--out", str(tmp_path / "out"), *options],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    _one_line_error(proc, words)
    assert not (tmp_path / "out").exists()
