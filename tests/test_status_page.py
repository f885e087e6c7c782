"""The gateway status server: JSON feed, /metrics, /healthz, the page's files and CSP, and the
page rendered by a headless Chromium (so its script demonstrably ran).

Most tests feed the server a hand-built GatewaySnapshot, so every served value is known exactly;
one test runs a real federation and serves `coordinator.snapshot`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.snapshot import GatewaySnapshot, RoundSummary
from aggregator.status import StatusServer
from transport.broker import Broker

FED = "fed-status"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 90

# A DP federation, three rounds closed, the fourth open. Round 1's loss is NaN as a device sent
# it: JSON must carry null and the page must skip the point.
HISTORY = (
    RoundSummary(round=0, devices=("dev-a", "dev-b"), samples=400.0, bytes_received=1000,
                 duration_s=1.5, metrics={"train_loss": 2.0, "train_accuracy": 0.5},
                 closed_at=1_700_000_000.0),
    RoundSummary(round=1, devices=("dev-a", "dev-b", "dev-c"), samples=500.0,
                 bytes_received=1500, duration_s=2.0,
                 metrics={"train_loss": math.nan, "train_accuracy": 0.75},
                 closed_at=1_700_000_002.0),
    RoundSummary(round=2, devices=("dev-b",), samples=300.0, bytes_received=700,
                 duration_s=0.25, metrics={"train_loss": 0.5, "train_accuracy": 0.875},
                 closed_at=1_700_000_003.0),
)
DP_FAMILY = {"epsilon": 1.75, "delta": 1e-5, "max_epsilon": 8.0}
EXACT_FAMILY = {"residual_rank": 4, "residual_rank_budget": 8, "truncation_error": 0.25,
                "truncation_error_max": 0.5}
SNAPSHOT = GatewaySnapshot(
    federation=FED, round=3, rounds=10, finished=False, mode="sync", strategy="dp-fedavg",
    connected=True, open_round=3, open_updates=1, open_bytes=420, clients_per_round=3,
    min_clients=2, online=("dev-b", "dev-a"), rejections={"malformed": 2, "stale": 1},
    family=DP_FAMILY, history=HISTORY,
)
# The exact family's devices report no metrics: the page must show no metric charts.
EXACT_SNAPSHOT = dataclasses.replace(
    SNAPSHOT, strategy="exact", family=EXACT_FAMILY,
    history=tuple(dataclasses.replace(h, metrics={}) for h in HISTORY))


class Feed:
    """What the server reads: returns `current`, which a test may swap between requests."""

    def __init__(self, snapshot: GatewaySnapshot) -> None:
        self.current = snapshot
        self.calls = 0

    def __call__(self) -> GatewaySnapshot:
        self.calls += 1
        return self.current


@pytest.fixture()
def feed() -> Feed:
    return Feed(SNAPSHOT)


@pytest.fixture()
def server(feed: Feed) -> Iterator[StatusServer]:
    with StatusServer(feed) as status:
        yield status


def _get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _static(name: str) -> str:
    return resources.files("aggregator").joinpath("static", name).read_text()


def _render(url: str, tmp_path: Path) -> str:
    """The page's DOM after a headless Chromium ran its script for a few virtual seconds."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run scripts/install_chromium.sh "
                    "(apt-get install chromium)")
    command = [
        CHROMIUM if Path(CHROMIUM).exists() else "chromium", "--headless", "--no-sandbox",
        "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000", "--dump-dom", url,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _svg(dom: str, chart_id: str) -> str:
    svg = re.search(rf'<svg id="{chart_id}".*?</svg>', dom, re.S)
    assert svg, chart_id
    return svg[0]


# -- JSON ------------------------------------------------------------------------------------
def test_api_status_is_the_snapshot_as_json(server: StatusServer) -> None:
    # Execute
    code, headers, body = _get(server.url + "api/status")

    # Assert: every key, exactly; NaN became null, tuples lists, totals sum the history
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "federation": FED, "round": 3, "rounds": 10, "finished": False, "mode": "sync",
        "strategy": "dp-fedavg", "connected": True,
        "open_round": {"round": 3, "updates": 1, "bytes_received": 420, "clients_per_round": 3,
                       "min_clients": 2},
        "online": ["dev-a", "dev-b"], "rejections": {"malformed": 2, "stale": 1},
        "updates_accepted": 6, "bytes_received": 3200, "last_round_duration_s": 0.25,
        "history": [
            {"round": 0, "devices": ["dev-a", "dev-b"], "num_devices": 2, "samples": 400.0,
             "bytes_received": 1000, "duration_s": 1.5,
             "metrics": {"train_loss": 2.0, "train_accuracy": 0.5}, "closed_at": 1_700_000_000.0},
            {"round": 1, "devices": ["dev-a", "dev-b", "dev-c"], "num_devices": 3,
             "samples": 500.0, "bytes_received": 1500, "duration_s": 2.0,
             "metrics": {"train_loss": None, "train_accuracy": 0.75},
             "closed_at": 1_700_000_002.0},
            {"round": 2, "devices": ["dev-b"], "num_devices": 1, "samples": 300.0,
             "bytes_received": 700, "duration_s": 0.25,
             "metrics": {"train_loss": 0.5, "train_accuracy": 0.875},
             "closed_at": 1_700_000_003.0},
        ],
        "family": {"epsilon": 1.75, "delta": 1e-5, "max_epsilon": 8.0},
        "certificates": {},
        "role": "",
    }
    assert "NaN" not in body and "Infinity" not in body


def test_api_status_before_any_round_and_with_non_finite_family(feed: Feed,
                                                                 server: StatusServer) -> None:
    # Prepare: nothing closed yet; an unbounded budget is +inf, which JSON cannot carry
    feed.current = dataclasses.replace(SNAPSHOT, history=(), round=0, open_round=0,
                                       family={"epsilon": 0.0, "max_epsilon": math.inf})

    # Execute
    state = json.loads(_get(server.url + "api/status")[2])
    samples = _samples(_get(server.url + "metrics")[2])

    # Assert
    assert state["history"] == [] and state["last_round_duration_s"] is None
    assert state["updates_accepted"] == 0 and state["bytes_received"] == 0
    assert state["family"] == {"epsilon": 0.0, "max_epsilon": None}
    # Prometheus text has +Inf, so the gauge keeps the real value
    assert samples[("edgefl_dp_epsilon_spent", ())] == 0.0
    assert samples[("edgefl_dp_epsilon_budget", ())] == math.inf
    assert ("edgefl_last_round_duration_seconds", ()) not in samples


def test_each_request_reads_one_fresh_snapshot(feed: Feed, server: StatusServer) -> None:
    # Execute: the coordinator swaps in a newer snapshot between two reads
    first = json.loads(_get(server.url + "api/status")[2])
    feed.current = dataclasses.replace(SNAPSHOT, round=4, open_round=4, open_updates=0)
    second = json.loads(_get(server.url + "api/status")[2])

    # Assert
    assert (first["round"], first["open_round"]["updates"]) == (3, 1)
    assert (second["round"], second["open_round"]["updates"]) == (4, 0)
    assert feed.calls == 2


# -- /metrics --------------------------------------------------------------------------------
def test_metrics_carry_the_snapshot_and_the_dp_gauges(server: StatusServer) -> None:
    # Execute
    code, headers, body = _get(server.url + "metrics")

    # Assert
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    samples = _samples(body)
    assert samples == {
        ("edgefl_round", ()): 3,
        ("edgefl_rounds_target", ()): 10,
        ("edgefl_devices_online", ()): 2,
        ("edgefl_open_round_updates", ()): 1,
        ("edgefl_updates_accepted_total", ()): 6,
        ("edgefl_bytes_received_total", ()): 3200,
        ("edgefl_updates_rejected_total", (("reason", "malformed"),)): 2,
        ("edgefl_updates_rejected_total", (("reason", "stale"),)): 1,
        ("edgefl_last_round_duration_seconds", ()): 0.25,
        ("edgefl_last_round_metric", (("name", "train_accuracy"),)): 0.875,
        ("edgefl_last_round_metric", (("name", "train_loss"),)): 0.5,
        ("edgefl_dp_epsilon_spent", ()): 1.75,
        ("edgefl_dp_epsilon_budget", ()): 8.0,
        ("edgefl_broker_connected", ()): 1,
    }


def test_metrics_carry_the_residual_gauges_and_no_empty_metric_family(
        feed: Feed, server: StatusServer) -> None:
    # Prepare: an exact federation whose devices report no metrics, budget-less DP facts absent
    feed.current = EXACT_SNAPSHOT

    # Execute
    body = _get(server.url + "metrics")[2]

    # Assert
    samples = _samples(body)
    assert samples[("edgefl_residual_rank", ())] == 4
    assert samples[("edgefl_residual_truncation_error", ())] == 0.25
    assert "edgefl_dp_epsilon" not in body
    assert "edgefl_last_round_metric" not in body


def _certificates(now: dt.datetime) -> dict[str, str]:
    """Expiries as certificate_expiry writes them: two far off, one soon, one past."""
    days = {"ca": 3000, "aggregator": 400, "dev-a": 10, "dev-b": -2}
    return {identity: (now + dt.timedelta(days=d)).isoformat() for identity, d in days.items()}


def test_certificate_expiry_is_in_the_json_and_one_gauge_per_identity(
        feed: Feed, server: StatusServer) -> None:
    # Prepare: a malformed date (the field is free text) is left out of the gauges
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    certificates = _certificates(now)
    feed.current = dataclasses.replace(SNAPSHOT,
                                       certificates={**certificates, "broker": "soon"})

    # Execute
    state = json.loads(_get(server.url + "api/status")[2])
    samples = _samples(_get(server.url + "metrics")[2])

    # Assert
    assert state["certificates"] == {**certificates, "broker": "soon"}
    gauges = {dict(labels)["identity"]: value for (name, labels), value in samples.items()
              if name == "edgefl_certificate_expiry_timestamp_seconds"}
    assert gauges == {identity: dt.datetime.fromisoformat(iso).timestamp()
                      for identity, iso in certificates.items()}
    assert gauges["dev-a"] == pytest.approx(now.timestamp() + 10 * 86400)


def test_no_certificate_gauge_without_certificates(server: StatusServer) -> None:
    assert "edgefl_certificate_expiry" not in _get(server.url + "metrics")[2]


def test_dp_budget_gauge_is_left_out_when_there_is_no_budget(feed: Feed,
                                                             server: StatusServer) -> None:
    # Prepare
    feed.current = dataclasses.replace(SNAPSHOT, family={"epsilon": 3.0, "max_epsilon": None})

    # Execute
    samples = _samples(_get(server.url + "metrics")[2])

    # Assert
    assert samples[("edgefl_dp_epsilon_spent", ())] == 3.0
    assert ("edgefl_dp_epsilon_budget", ()) not in samples


def test_counters_keep_counting_when_old_rounds_leave_the_bounded_history(
        feed: Feed, server: StatusServer) -> None:
    # Prepare: the coordinator's history holds two rounds; round 0 drops out as round 3 closes
    feed.current = dataclasses.replace(SNAPSHOT, history=HISTORY[:2])
    before = _samples(_get(server.url + "metrics")[2])
    round_3 = dataclasses.replace(HISTORY[2], round=3)
    feed.current = dataclasses.replace(SNAPSHOT, history=(HISTORY[1], round_3))

    # Execute
    after = _samples(_get(server.url + "metrics")[2])
    state = json.loads(_get(server.url + "api/status")[2])

    # Assert: counters only grow (a drop reads as a reset to Prometheus); each round once
    assert before[("edgefl_updates_accepted_total", ())] == 5
    assert after[("edgefl_updates_accepted_total", ())] == 6
    assert before[("edgefl_bytes_received_total", ())] == 2500
    assert after[("edgefl_bytes_received_total", ())] == 3200
    assert (state["updates_accepted"], state["bytes_received"]) == (6, 3200)
    assert [h["round"] for h in state["history"]] == [1, 3]


# -- /healthz, routing, files, headers -------------------------------------------------------
def test_healthz_follows_the_snapshots_broker_link(feed: Feed, server: StatusServer) -> None:
    # Execute / Assert: 200 while connected, 503 once the snapshot says the link is down, 200
    # again when it is back
    assert _get(server.url + "healthz")[::2] == (200, "ok\n")
    feed.current = dataclasses.replace(SNAPSHOT, connected=False)
    code, _, body = _get(server.url + "healthz")
    assert code == 503 and body == "broker disconnected\n"
    assert _samples(_get(server.url + "metrics")[2])[("edgefl_broker_connected", ())] == 0
    feed.current = SNAPSHOT
    assert _get(server.url + "healthz")[0] == 200


def test_unknown_paths_are_404(server: StatusServer) -> None:
    for path in ("no-such-page", "static/status.js", "status.html", "../pyproject.toml"):
        code, headers, body = _get(server.url + path)
        assert (code, body) == (404, "not found\n"), path
        assert headers["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(("path", "name", "content_type"), [
    ("", "status.html", "text/html; charset=utf-8"),
    ("status.css", "status.css", "text/css; charset=utf-8"),
    ("status.js", "status.js", "text/javascript; charset=utf-8"),
])
def test_page_files_are_served_from_the_package(server: StatusServer, path: str, name: str,
                                                content_type: str) -> None:
    # Execute
    code, headers, body = _get(server.url + path)

    # Assert
    assert code == 200 and headers["Content-Type"] == content_type
    assert body == _static(name) and body.strip()
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"


def test_page_has_a_strict_csp_and_no_inline_code(server: StatusServer) -> None:
    # Execute
    _, headers, html = _get(server.url)

    # Assert: scripts and styles only from this server's own files, nothing inline
    csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert re.findall(r"<script[^>]*>", html) == ['<script src="status.js" defer>']
    assert '<link rel="stylesheet" href="status.css">' in html
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son\w+\s*=", html, re.I), "inline event handler"
    # The script never parses received text as HTML
    script = _static("status.js")
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script


def test_a_failing_snapshot_is_a_500_and_the_server_keeps_serving(
        feed: Feed, server: StatusServer) -> None:
    # Prepare
    def broken() -> GatewaySnapshot:
        raise RuntimeError("coordinator bug")

    server.snapshot = broken

    # Execute / Assert
    assert _get(server.url + "api/status")[0] == 500
    assert _get(server.url + "healthz")[0] == 500
    server.snapshot = feed
    assert _get(server.url + "api/status")[0] == 200


# -- the page in a browser -------------------------------------------------------------------
def test_dp_status_page_renders_in_headless_chromium(server: StatusServer,
                                                     tmp_path: Path) -> None:
    # Execute
    dom = _render(server.url, tmp_path)

    # Assert: the values and chart elements exist only if the page's script fetched and drew
    assert re.search(r'<span id="error"></span>', dom), "the page reported a fetch error"
    assert f'<span id="federation">{FED}</span>' in dom
    assert '<span id="round">3</span>' in dom and '<span id="rounds">10</span>' in dom
    assert '<span id="state" class="muted">collecting 1/3 updates</span>' in dom
    assert '<b id="connected">connected</b>' in dom
    assert '<b id="online-count">2</b>' in dom
    assert '<b id="accepted">6</b>' in dom and '<b id="rejected">3</b>' in dom
    assert '<b id="bytes">3.2k</b>' in dom
    # the ε card is shown with its budget and δ; the residual card is not
    assert '<div class="card" id="card-epsilon">' in dom
    assert '<b id="epsilon">1.750</b>' in dom
    assert '<span id="epsilon-detail" class="muted">budget 8 · δ 1.00e-5</span>' in dom
    assert re.search(r'<div class="card" id="card-residual" hidden(="")?>', dom)
    # one bar per round of the history, labelled with its round
    bars = _svg(dom, "chart-bytes")
    assert len(re.findall(r'<rect [^>]*class="bar"', bars)) == len(HISTORY)
    assert ">r0</text>" in bars and ">r2</text>" in bars
    assert [int(n) for n in re.findall(r"<title>round (\d+): ", bars)] == [0, 1, 2]
    # accuracy has all three rounds; round 1's NaN loss is left out of the loss chart
    assert re.search(r'<figure id="figure-accuracy">', dom)
    accuracy, loss = _svg(dom, "chart-accuracy"), _svg(dom, "chart-loss")
    assert accuracy.count('class="line"') == 1 and loss.count('class="line"') == 1
    assert len(re.findall(r'<circle [^>]*class="point"', accuracy)) == 3
    assert len(re.findall(r'<circle [^>]*class="point"', loss)) == 2
    assert "<td>malformed</td><td>2</td>" in dom and "<td>stale</td><td>1</td>" in dom
    assert "<td>dev-a</td>" in dom and "<td>dev-b</td>" in dom and "<td>dev-c</td>" not in dom
    # no certificates in this snapshot: their table stays hidden
    assert re.search(r'<section id="certificates-section" hidden(="")?>', dom)
    # one whole aggregator: no role line
    assert re.search(r'<p id="role" class="muted" hidden(="")?></p>', dom)


def test_status_page_shows_a_scaled_out_process_role(feed: Feed, server: StatusServer,
                                                     tmp_path: Path) -> None:
    feed.current = dataclasses.replace(SNAPSHOT, role="leader of 4 worker processes")
    dom = _render(server.url, tmp_path)
    assert '<p id="role" class="muted">leader of 4 worker processes</p>' in dom


def test_status_page_lists_certificates_and_highlights_those_expiring_soon(
        feed: Feed, server: StatusServer, tmp_path: Path) -> None:
    # Prepare
    now = dt.datetime.now(dt.UTC)
    feed.current = dataclasses.replace(SNAPSHOT, certificates=_certificates(now))

    # Execute
    dom = _render(server.url, tmp_path)

    # Assert: sorted by identity; within 30 days (or expired) is highlighted, the rest is not
    assert re.search(r'<span id="error"></span>', dom), "the page reported a fetch error"
    assert '<section id="certificates-section">' in dom
    table = re.search(r'<tbody id="certificates">(.*?)</tbody>', dom, re.S)
    assert table
    rows = re.findall(r"<tr( class=\"expiring\")?><td>([^<]*)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td></tr>", table[1])
    assert [(identity, bool(marked)) for marked, identity, _, _ in rows] == [
        ("aggregator", False), ("ca", False), ("dev-a", True), ("dev-b", True)]
    days_left = {identity: left for _, identity, _, left in rows}
    assert days_left["dev-b"] == "expired" and int(days_left["dev-a"]) in (9, 10)
    expires = {identity: date for _, identity, date, _ in rows}
    assert expires["aggregator"] == (now + dt.timedelta(days=400)).date().isoformat()


def test_exact_status_page_shows_the_residual_and_no_metric_charts(
        feed: Feed, server: StatusServer, tmp_path: Path) -> None:
    # Prepare
    feed.current = EXACT_SNAPSHOT

    # Execute
    dom = _render(server.url, tmp_path)

    # Assert
    assert re.search(r'<span id="error"></span>', dom), "the page reported a fetch error"
    assert '<div class="card" id="card-residual">' in dom
    assert '<b id="residual-rank">4</b>' in dom
    assert ('<span id="residual-detail" class="muted">'
            "budget 8 · truncation error 0.250 (max 0.500)</span>") in dom
    assert re.search(r'<div class="card" id="card-epsilon" hidden(="")?>', dom)
    # no device metrics: their charts stay hidden and empty; the bytes chart still draws
    for figure, chart in (("figure-accuracy", "chart-accuracy"), ("figure-loss", "chart-loss")):
        assert re.search(rf'<figure id="{figure}" hidden(="")?>', dom), figure
        assert "<circle" not in _svg(dom, chart) and "no rounds yet" not in _svg(dom, chart)
    assert len(re.findall(r'<rect [^>]*class="bar"', _svg(dom, "chart-bytes"))) == len(HISTORY)


# -- a real federation -----------------------------------------------------------------------
FED_ROUNDS = 2
# device -> (samples, per-round (train_loss, train_accuracy))
DEVICES = {"dev-a": (100, [(1.0, 0.5), (0.5, 0.8)]), "dev-b": (300, [(2.0, 0.7), (1.0, 0.9)])}


def _expected_metric(round_number: int, index: int) -> float:
    total = sum(samples for samples, _ in DEVICES.values())
    weighted = sum(samples * rounds[round_number][index] for samples, rounds in DEVICES.values())
    return weighted / total


def _poll(base_url: str, running: threading.Thread, codes: list[int]) -> None:
    while running.is_alive():
        for path in ("api/status", "metrics"):
            codes.append(_get(base_url + path)[0])
        time.sleep(0.01)


def test_federation_serves_the_coordinators_snapshot(mosquitto: Broker, cnn_artifacts: Path,
                                                     tmp_path: Path) -> None:
    # Imported here: the snapshot tests above need neither the coordinator nor a broker client.
    from safetensors.numpy import load_file

    from aggregator.config import AggregatorConfig
    from aggregator.coordinator import Coordinator
    from aggregator.store import GlobalStore
    from export.build import ADAPTER_INIT_FILE
    from protocol import codec, topics
    from protocol.manifest import load_manifest
    from protocol.messages import Update
    from transport.mqtt import MqttTransport

    # Prepare: coordinator + status server on its snapshot, a device-side client and a watcher
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    config = AggregatorConfig(federation=FED, rounds=FED_ROUNDS, clients_per_round=2,
                              min_clients=2, round_deadline_s=60)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg")
    agg.start()
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"))
    device = MqttTransport(mosquitto.host, mosquitto.port, "status-test-device")
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "status-test-watcher")
    transports = [agg, device, watcher]
    rng = np.random.default_rng(0)
    with StatusServer(coordinator.snapshot) as status:
        try:
            device.start()
            watcher.start()
            watcher.subscribe(topics.global_topic(FED))

            # Execute: presence messages, one malformed update, then two devices for two
            # rounds, while a poller reads the status the whole time
            thread = threading.Thread(target=coordinator.run, daemon=True)
            thread.start()
            poll_codes: list[int] = []
            poller = threading.Thread(target=_poll, args=(status.url, thread, poll_codes),
                                      daemon=True)
            poller.start()
            for device_id, online in [("dev-a", True), ("dev-b", True), ("dev-c", True),
                                      ("dev-c", False)]:
                # Retained, as devices send them: the coordinator may subscribe after they went
                device.publish(topics.status_topic(FED, device_id),
                               codec.encode_status(online, device_id), qos=1, retain=True)
            bytes_per_round = []
            for round_number in range(FED_ROUNDS):
                while (message := watcher.receive(15)) is not None:
                    if codec.decode_global(message.payload).round == round_number:
                        break
                assert message is not None, f"round {round_number} never opened"
                if round_number == 0:
                    device.publish(topics.update_topic(FED, "dev-a"), b"\x00garbage", qos=1)
                sent = 0
                for device_id, (samples, per_round) in DEVICES.items():
                    loss, accuracy = per_round[round_number]
                    payload = codec.encode_update(Update(
                        federation=FED, round=round_number, device_id=device_id,
                        manifest_sha256=manifest.sha256, num_samples=samples,
                        update_id=uuid.uuid4().hex,
                        adapter={k: rng.standard_normal(v.shape).astype(np.float32)
                                 for k, v in initial.items()},
                        metrics={"train_loss": loss, "train_accuracy": accuracy}))
                    device.publish(topics.update_topic(FED, device_id), payload, qos=1)
                    sent += len(payload)
                bytes_per_round.append(sent)
            thread.join(30)
            assert not thread.is_alive(), "the federation did not finish"
            poller.join(10)
            state = json.loads(_get(status.url + "api/status")[2])
            samples = _samples(_get(status.url + "metrics")[2])
            healthy = _get(status.url + "healthz")[::2]
            mosquitto.stop()
            deadline = time.monotonic() + 15
            while coordinator.snapshot().connected and time.monotonic() < deadline:
                time.sleep(0.1)
            unhealthy = _get(status.url + "healthz")[0]
        finally:
            for transport in transports:
                transport.stop()

    # Assert: every poll during the run succeeded (the coordinator changed state meanwhile)
    assert poll_codes and set(poll_codes) == {200}, poll_codes
    assert state["federation"] == FED
    assert state["round"] == FED_ROUNDS and state["rounds"] == FED_ROUNDS and state["finished"]
    assert state["connected"] is True
    assert state["online"] == ["dev-a", "dev-b"]
    assert state["rejections"] == {"malformed": 1}
    assert state["updates_accepted"] == 2 * FED_ROUNDS
    assert state["bytes_received"] == sum(bytes_per_round)
    assert [h["round"] for h in state["history"]] == list(range(FED_ROUNDS))
    for round_number, entry in enumerate(state["history"]):
        assert entry["devices"] == sorted(DEVICES)
        assert entry["samples"] == 400
        assert entry["bytes_received"] == bytes_per_round[round_number]
        assert entry["metrics"]["train_loss"] == pytest.approx(_expected_metric(round_number, 0))
        assert entry["metrics"]["train_accuracy"] == pytest.approx(
            _expected_metric(round_number, 1))
    assert samples[("edgefl_round", ())] == FED_ROUNDS
    assert samples[("edgefl_devices_online", ())] == 2
    assert samples[("edgefl_updates_accepted_total", ())] == 2 * FED_ROUNDS
    assert samples[("edgefl_bytes_received_total", ())] == sum(bytes_per_round)
    assert samples[("edgefl_updates_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("edgefl_last_round_duration_seconds", ())] == pytest.approx(
        state["history"][-1]["duration_s"])
    assert samples[("edgefl_last_round_metric", (("name", "train_accuracy"),))] == pytest.approx(
        _expected_metric(FED_ROUNDS - 1, 1))
    assert samples[("edgefl_broker_connected", ())] == 1
    assert healthy == (200, "ok\n")
    assert unhealthy == 503
