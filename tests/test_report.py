"""edgefl.report: a hand-built results.json (the demo's structure plus device_accuracy) becomes a
self-contained report.html, which a headless Chromium renders: title, summary values, and every
chart decoded as an image; partial results (no rounds, NaN, nulls) still give a page; the
command line fails in one line.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from edgefl.report import CSP, format_bytes, load_results, summary, write_report

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 90
FEDERATION = "run-report"
WINDOW = (1280, 1600)

ACCURACY = (0.1, 0.55, 0.7, 0.8142)
LOSS = (3.3, 1.2, 0.9, 0.61)
BYTES_UP, BYTES_DOWN = 120_000, 110_000  # per round after round 0: 690.0 kB over three rounds
DEVICE_ACCURACY = {"dev-00000": 0.83, "dev-00001": 0.78, "dev-00002": 0.91, "dev-00003": 0.66}


def _results(rounds: int = 3, **extra: Any) -> dict[str, Any]:
    """What edgefl.demo's run_federation writes for a 4-device fedavg run, plus `extra`."""
    return {
        "broker": "mosquitto", "data": "fashion-mnist",
        "config": {
            "fleet": {"devices": 4, "backends": ["executorch", "onnxruntime"], "alpha": 0.5,
                      "seed": 0, "slowdown": [1.0] * 4, "dropout": 0.0,
                      "connection_loss": 0.0, "multitask": False},
            "rounds": rounds, "local_steps": 20, "learning_rate": 0.05, "participation": 1.0,
            "quorum": 0.5, "deadline_s": 300.0, "mode": "sync", "update_encoding": "fp32",
            "update_topk": None, "strategy": "fedavg", "eval_size": 2000,
            "workload": "fmnist-cnn", "out_dir": "runs/demo", "broker": "mosquitto",
            "num_clusters": 2, "task_schedule": [], "rounds_per_task": 1,
        },
        "rounds": [
            {"round": i, "accuracy": ACCURACY[i], "loss": LOSS[i], "devices": 0 if i == 0 else 4,
             "bytes_up": 0 if i == 0 else BYTES_UP, "bytes_down": 0 if i == 0 else BYTES_DOWN,
             "seconds": 0.5 * i}
            for i in range(rounds + 1)
        ],
        "rejections": {"malformed": 2, "stale": 1},
        "skipped_rounds": 1, "links_lost": 0,
        **extra,
    }


def _write(tmp_path: Path, results: dict[str, Any] | str, federation: str = FEDERATION) -> Path:
    run_dir = tmp_path / "runs" / "demo" / federation
    run_dir.mkdir(parents=True)
    path = run_dir / "results.json"
    path.write_text(results if isinstance(results, str) else json.dumps(results, indent=1))
    return path


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with the flags the project's other browser test uses."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run scripts/install_chromium.sh "
                    "(apt-get install chromium)")
    command = [
        CHROMIUM if Path(CHROMIUM).exists() else "chromium", "--headless", "--no-sandbox",
        "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000", *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _dom(page: Path, tmp_path: Path) -> str:
    return _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout


def _probe(page: Path) -> Path:
    """A copy of the page whose CSP also allows one inline script, which writes every image's
    decoded size into the DOM once the page has loaded."""
    text = page.read_text()
    assert f'content="{CSP}"' in text
    text = text.replace(f'content="{CSP}"', f'content="{CSP}; script-src \'unsafe-inline\'"')
    script = ("<script>addEventListener('load', () => { const p = document.createElement('pre');"
              " p.id = 'probe'; p.textContent = JSON.stringify([...document.images].map("
              "i => [i.id, i.complete, i.naturalWidth, i.naturalHeight]));"
              " document.body.appendChild(p); });</script>")
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", script + "</body>"))
    return probe


def _png_sizes(page_html: str) -> dict[str, tuple[int, int]]:
    """Each embedded image's id -> the width and height its PNG header declares."""
    sizes = {}
    for image_id, data in re.findall(r'<img id="([\w-]+)" alt="[^"]*" '
                                     r'src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page_html):
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[image_id] = struct.unpack(">II", png[16:24])
    return sizes


def _cell(label: str, value: str) -> str:
    return f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"


# -- the page in a browser -----------------------------------------------------------------------
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    # Prepare
    results_json = _write(tmp_path, _results(device_accuracy=DEVICE_ACCURACY))

    # Execute
    page = write_report(results_json)
    dom = _dom(page, tmp_path)

    # Assert: beside the results, titled after the federation, with the summary's values
    assert page == results_json.parent / "report.html"
    assert f"<title>edgefl report · {FEDERATION}</title>" in dom
    assert f'<h1 id="title">edgefl report · {FEDERATION}</h1>' in dom
    for label, value in [("Workload", "fmnist-cnn"), ("Strategy", "fedavg"),
                         ("Devices", "4 (executorch, onnxruntime)"), ("Rounds", "3 of 3"),
                         ("Final accuracy", "81.4%"), ("Total bytes", "690.0 kB"),
                         ("Bytes up / down", "360.0 kB / 330.0 kB"),
                         ("Rejections", "3 (malformed 2, stale 1)"), ("Skipped rounds", "1")]:
        assert _cell(label, value) in dom, label
    # four charts: accuracy, loss, traffic and (since the results carry it) accuracy per device
    images = re.findall(r"<img [^>]*>", dom)
    assert [re.search(r'id="([\w-]+)"', i)[1] for i in images] == [
        "chart-accuracy", "chart-loss", "chart-bytes", "chart-devices"]
    assert all('src="data:image/png;base64,' in i for i in images)

    # Execute: the same page with a probe script reporting what the browser decoded
    probe = _dom(_probe(page), tmp_path)

    # Assert: every image loaded, at the size its PNG declares
    found = re.search(r'<pre id="probe">(.*?)</pre>', probe, re.DOTALL)
    assert found, "the probe script did not run"
    decoded = {i: (complete, w, h) for i, complete, w, h in json.loads(html.unescape(found[1]))}
    declared = _png_sizes(page.read_text())
    assert len(decoded) == 4 and decoded.keys() == declared.keys()
    for image_id, (complete, width, height) in decoded.items():
        assert complete and width > 0 and height > 0, image_id
        assert (width, height) == declared[image_id], image_id


def test_report_screenshot_shows_the_charts(tmp_path: Path) -> None:
    # Prepare
    page = write_report(_write(tmp_path, _results(device_accuracy=DEVICE_ACCURACY)))
    shot = tmp_path / "report.png"

    # Execute
    _chromium(tmp_path, "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
              f"--screenshot={shot}", page.as_uri())

    # Assert: not blank, and the accuracy line's blue and the traffic bars' teal were painted
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.int16)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    assert pixels.reshape(-1, 3).std(axis=0).max() > 20
    for colour in ("#2f6db5", "#2a9d8f"):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        near = np.abs(pixels - rgb).max(axis=-1) <= 12
        assert near.sum() > 500, f"{colour} is missing from the screenshot"


@pytest.mark.parametrize("rows", [0, 1], ids=["no-rows", "initial-scoring-only"])
def test_zero_round_run_still_gives_a_valid_page(tmp_path: Path, rows: int) -> None:
    # Prepare: `--rounds 0` (the demo scores the initial adapter: one row), or no rows at all
    results = _results(rounds=0)
    results["rounds"] = results["rounds"][:rows]
    results["rejections"] = {}

    # Execute
    page = write_report(_write(tmp_path, results))
    dom = _dom(page, tmp_path)

    # Assert: a whole page; no traffic chart, the others only when there is a point to draw
    assert f"<title>edgefl report · {FEDERATION}</title>" in dom and "</table>" in dom
    assert _cell("Rounds", "0 of 0") in dom and _cell("Total bytes", "0 B") in dom
    assert _cell("Rejections", "0") in dom
    assert _cell("Final accuracy", "10.0%" if rows else "—") in dom
    assert "no traffic recorded" in dom
    assert len(re.findall(r"<img ", dom)) == (2 if rows else 0)
    if not rows:
        assert "no accuracy recorded" in dom and "no loss recorded" in dom


# -- partial and odd data ------------------------------------------------------------------------
def test_nan_null_and_missing_values_do_not_break_the_page(tmp_path: Path) -> None:
    # Prepare: NaN (Python's json writes it), nulls, a string, a missing key, a bad row
    results = _results(device_accuracy={"dev-00000": 0.8, "dev-00001": None,
                                        "dev-00002": math.nan})
    results["rounds"][1]["loss"] = math.nan
    results["rounds"][2]["accuracy"] = None
    results["rounds"][2]["bytes_up"] = "lots"
    del results["rounds"][3]["bytes_down"]
    results["rounds"][3]["accuracy"] = math.nan
    results["rounds"].append("not a row")
    results["rejections"] = {"stale": None}
    results_json = _write(tmp_path, json.dumps(results))
    assert "NaN" in results_json.read_text()

    # Execute
    page = write_report(results_json)

    # Assert: every chart still drawn; unknowns shown as a dash, totals over what is known
    text = page.read_text()
    assert len(_png_sizes(text)) == 4
    rows = dict(summary(load_results(results_json)))
    assert rows["Final accuracy"] == "—"
    assert rows["Bytes up / down"] == "240.0 kB / 220.0 kB"
    assert rows["Rejections"] == "0 (stale —)"
    assert "2 not scored" in text


def test_device_accuracy_is_optional_and_big_fleets_get_a_histogram(tmp_path: Path) -> None:
    # Execute: no device_accuracy, then more devices than bars would show
    plain = write_report(_write(tmp_path, _results(), "run-plain")).read_text()
    fleet = {f"dev-{i:05d}": 0.5 + (i % 40) / 100 for i in range(300)}
    big = write_report(_write(tmp_path, _results(device_accuracy=fleet), "run-big")).read_text()

    # Assert
    assert list(_png_sizes(plain)) == ["chart-accuracy", "chart-loss", "chart-bytes"]
    assert "chart-devices" in _png_sizes(big)
    assert 'alt="Histogram of per-device accuracy"' in big and "300 devices" in big


def test_page_is_self_contained(tmp_path: Path) -> None:
    # Execute
    text = write_report(_write(tmp_path, _results(device_accuracy=DEVICE_ACCURACY))).read_text()

    # Assert: nothing to fetch, no script, and a policy that would block either
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert "default-src 'none'" in CSP
    assert not re.search(r"https?://|<script|<link|@import|url\(", text)
    assert all(src.startswith("data:image/png;base64,")
               for src in re.findall(r'src="([^"]*)"', text))


def test_results_json_is_escaped_into_the_page(tmp_path: Path) -> None:
    # Prepare
    results = _results(device_accuracy={"<b>dev</b>": 0.5})
    results["config"]["workload"] = "<script>alert(1)</script>"

    # Execute
    text = write_report(_write(tmp_path, results)).read_text()

    # Assert
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (999, "999 B"), (60_547, "60.5 kB"), (1_234_567, "1.23 MB"),
    (21e6, "21.0 MB"), (math.nan, "—")])
def test_format_bytes(value: float, text: str) -> None:
    assert format_bytes(value) == text


# -- command line --------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefl.report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_writes_the_report_and_prints_its_path(tmp_path: Path) -> None:
    # Prepare
    results_json = _write(tmp_path, _results())

    # Execute
    proc = _cli(str(results_json))

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(results_json.parent / "report.html")
    assert (results_json.parent / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"), ("{not json", "is not valid JSON"),
    ("[1, 2]", "does not hold a results object")])
def test_cli_fails_in_one_line_without_a_traceback(tmp_path: Path, content: str | None,
                                                   message: str) -> None:
    # Prepare
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)

    # Execute
    proc = _cli(str(path))

    # Assert
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("python -m edgefl.report: error:")
    assert message in proc.stderr
    assert not (tmp_path / "report.html").exists()


# -- the demo's own report -----------------------------------------------------------------------
def test_the_demos_own_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    # Prepare: a small real federation (Mosquitto, ExecuTorch + ONNX Runtime devices)
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "demo", "--devices", "3", "--rounds", "2",
         "--local-steps", "3", "--out", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (results_json,) = (tmp_path / "runs").glob("run-*/results.json")
    page = results_json.parent / "report.html"

    # Execute
    dom = _dom(_probe(page), tmp_path)

    # Assert: the demo scored each device's final model, and the page shows all four charts,
    # every one decoded by the browser
    results = json.loads(results_json.read_text())
    assert sorted(results["device_accuracy"]) == ["dev-00000", "dev-00001", "dev-00002"]
    assert all(0.0 < v <= 1.0 for v in results["device_accuracy"].values())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, "the probe script did not run"
    decoded = {i: (complete, w) for i, complete, w, _ in json.loads(html.unescape(found[1]))}
    assert sorted(decoded) == ["chart-accuracy", "chart-bytes", "chart-devices", "chart-loss"]
    assert all(complete and width > 0 for complete, width in decoded.values()), decoded
    assert f"<title>edgefl report · {results_json.parent.name}</title>" in dom
