"""`edgefl emulate`: a fleet too large for one process (300 devices, 2 workers) completes rounds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.fleet import DEVICES_PER_PROCESS

REPO = Path(__file__).resolve().parent.parent


def test_emulated_fleet_over_worker_processes_completes_rounds(tmp_path: Path,
                                                             cnn_artifacts: Path) -> None:
    devices = DEVICES_PER_PROCESS + 50  # forces the multi-process path
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--devices", str(devices), "--rounds", "2",
         "--local-steps", "1", "--dropout", "0.05", "--connection-loss", "0.02",
         "--slowdown", "1,2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    rounds = report["rounds"][1:]
    assert len(rounds) == 2
    # The round closes at 90% participation; dropouts (5%) leave enough devices for that.
    assert all(r["devices"] >= 0.9 * devices for r in rounds)
    assert report["skipped_rounds"] > 0 and report["links_lost"] > 0  # behaviours took effect
    assert rounds[-1]["accuracy"] > report["rounds"][0]["accuracy"]


def test_emulate_runs_native_devices_in_the_fleet(tmp_path: Path, cnn_artifacts: Path,
                                                  native_build: Path) -> None:
    # 4 devices, the last 2 native C++ processes; every round must wait for all 4
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--devices", "4", "--native", "2",
         "--rounds", "2", "--local-steps", "5", "--participation", "1.0", "--quorum", "1.0",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    assert [r["devices"] for r in report["rounds"][1:]] == [4, 4]
    assert report["native_failures"] == 0 and not report["rejections"]
    devices = results.parent / "devices"
    for device_id in ("dev-00002", "dev-00003"):  # the native ones kept their state and log
        assert json.loads((devices / f"{device_id}.json").read_text()) == {"last_round": 1}
        assert "trained 2 rounds" in (devices / f"{device_id}.log").read_text()
    assert not (devices / "dev-00000.log").exists()  # a Python device


def test_many_native_devices_share_fleet_processes(tmp_path: Path, cnn_artifacts: Path,
                                                   native_build: Path) -> None:
    # 400 native devices: more than one edgefl-fleet process holds (select() caps each)
    from edge_client.fleet import NATIVE_PER_PROCESS

    devices = NATIVE_PER_PROCESS + 100
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--devices", str(devices), "--native",
         str(devices), "--rounds", "2", "--local-steps", "1", "--participation", "1.0",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    assert [r["devices"] for r in report["rounds"][1:]] == [devices, devices]
    assert report["native_failures"] == 0 and not report["rejections"]
    logs = sorted((results.parent / "devices").glob("fleet-*.log"))
    assert [log.name for log in logs] == ["fleet-00000.log", f"fleet-{NATIVE_PER_PROCESS:05d}.log"]
    assert f"{NATIVE_PER_PROCESS} devices: {2 * NATIVE_PER_PROCESS} device-rounds trained, " \
           "0 failed" in logs[0].read_text()


@pytest.mark.parametrize("kind", ["python", "native"])
def test_a_fleet_through_aggregator_worker_processes(tmp_path: Path, cnn_artifacts: Path,
                                                     kind: str, request: pytest.FixtureRequest
                                                     ) -> None:
    if kind == "native":  # the C++ edgefl-ingest (aggregator/native) as both workers
        request.getfixturevalue("native_build")
    # 30 devices, every update through one of 2 worker processes on a shared subscription
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "emulate", "--devices", "30", "--rounds", "2",
         "--local-steps", "5", "--participation", "1.0", "--quorum", "1.0",
         "--aggregator-workers", "2", "--aggregator-worker-kind", kind, "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("*/results.json")
    report = json.loads(results.read_text())
    assert [r["devices"] for r in report["rounds"][1:]] == [30, 30]
    assert report["aggregator_workers"] == 2 and report["worker_restarts"] == 0
    assert report["aggregator_worker_kind"] == kind
    # Each accepted update is an INFO line, shown only with -v: the terminal stays the fleet's.
    assert "accepted" not in proc.stderr + proc.stdout
    assert not report["rejections"]
    assert report["rounds"][-1]["accuracy"] > report["rounds"][0]["accuracy"]
    (database,) = results.parent.glob("aggregator/*/aggregator.sqlite")
    with sqlite3.connect(database) as db:
        shares = db.execute("SELECT round, worker, count FROM partials ORDER BY round, worker")
        per_round: dict[int, dict[str, int]] = {}
        for round_number, worker, count in shares:
            per_round.setdefault(round_number, {})[worker] = count
    # Each round was merged from both workers' partial sums, which together hold every update.
    assert {r: sorted(w) for r, w in per_round.items()} == {0: ["w0", "w1"], 1: ["w0", "w1"]}
    assert all(sum(w.values()) == 30 and min(w.values()) > 0 for w in per_round.values())
