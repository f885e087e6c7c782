"""The gateway status server over a real federation: JSON feed, /metrics, /healthz, and the page
rendered by a headless Chromium (so its script demonstrably ran)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, RoundRecord
from aggregator.status import StatusServer
from aggregator.store import GlobalStore
from export.build import ADAPTER_INIT_FILE
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import Update
from transport.broker import Broker
from transport.mqtt import MqttTransport

FED = "fed-status"
ROUNDS = 2
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 90
# device -> (samples, per-round (train_loss, train_accuracy))
DEVICES = {"dev-a": (100, [(1.0, 0.5), (0.5, 0.8)]), "dev-b": (300, [(2.0, 0.7), (1.0, 0.9)])}


@dataclass
class Federation:
    """A finished two-round federation whose aggregator (and status server) is still up."""

    status: StatusServer
    coordinator: Coordinator
    chained: list[RoundRecord]  # what the coordinator's original on_round callback saw
    bytes_per_round: list[int]
    transport: MqttTransport


def _expected_metric(round_number: int, index: int) -> float:
    total = sum(samples for samples, _ in DEVICES.values())
    weighted = sum(samples * rounds[round_number][index] for samples, rounds in DEVICES.values())
    return weighted / total


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _poll(base_url: str, running: threading.Thread, codes: list[int]) -> None:
    while running.is_alive():
        for path in ("api/status", "metrics"):
            codes.append(_get(base_url + path)[0])
        time.sleep(0.01)


@pytest.fixture()
def federation(mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path) -> Iterator[Federation]:
    # Prepare: coordinator + status server, a device-side client and a watcher of the global
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    config = AggregatorConfig(federation=FED, rounds=ROUNDS, clients_per_round=2, min_clients=2,
                              round_deadline_s=60)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg")
    agg.start()
    chained: list[RoundRecord] = []
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"),
                              on_round=lambda record, adapter: chained.append(record))
    status = StatusServer(coordinator)
    status.attach()
    status.start()
    device = MqttTransport(mosquitto.host, mosquitto.port, "status-test-device")
    device.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "status-test-watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))
    rng = np.random.default_rng(0)

    # Execute: presence messages, one malformed update, then two devices for two rounds, while
    # a poller reads the status the whole time (the coordinator mutates it on its own thread)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    poll_codes: list[int] = []
    poller = threading.Thread(target=_poll, args=(status.url, thread, poll_codes), daemon=True)
    poller.start()
    for device_id, online in [("dev-a", True), ("dev-b", True), ("dev-c", True),
                              ("dev-c", False)]:
        # Retained, as devices send them: the coordinator may subscribe after they went out.
        device.publish(topics.status_topic(FED, device_id),
                       codec.encode_status(online, device_id), qos=1, retain=True)
    bytes_per_round = []
    for round_number in range(ROUNDS):
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
    assert poll_codes and set(poll_codes) == {200}, poll_codes

    yield Federation(status, coordinator, chained, bytes_per_round, agg)
    status.stop()
    for transport in (agg, device, watcher):
        transport.stop()


def test_status_api_reports_rounds_online_devices_and_rejections(federation: Federation) -> None:
    # Execute
    code, content_type, body = _get(federation.status.url + "api/status")

    # Assert
    assert code == 200 and content_type == "application/json"
    state = json.loads(body)
    assert state["federation"] == FED
    assert state["round"] == ROUNDS and state["rounds"] == ROUNDS and state["finished"]
    assert state["connected"] is True
    assert state["online"] == ["dev-a", "dev-b"]
    assert state["rejections"] == {"malformed": 1}
    assert state["updates_accepted"] == 2 * ROUNDS
    assert state["bytes_received"] == sum(federation.bytes_per_round)
    assert [h["round"] for h in state["history"]] == list(range(ROUNDS))
    for round_number, entry in enumerate(state["history"]):
        assert entry["devices"] == sorted(DEVICES)
        assert entry["samples"] == 400
        assert entry["bytes_received"] == federation.bytes_per_round[round_number]
        assert entry["metrics"]["train_loss"] == pytest.approx(_expected_metric(round_number, 0))
        assert entry["metrics"]["train_accuracy"] == pytest.approx(
            _expected_metric(round_number, 1))
    # attach() chained in front of the coordinator's own callback, which still ran
    assert [r.round for r in federation.chained] == list(range(ROUNDS))


def test_metrics_parse_as_prometheus_text_with_federation_values(federation: Federation) -> None:
    # Execute
    code, content_type, body = _get(federation.status.url + "metrics")

    # Assert
    assert code == 200 and content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("edgefl_round", ())] == ROUNDS
    assert samples[("edgefl_rounds_target", ())] == ROUNDS
    assert samples[("edgefl_devices_online", ())] == 2
    assert samples[("edgefl_open_round_updates", ())] == 0
    assert samples[("edgefl_updates_accepted_total", ())] == 2 * ROUNDS
    assert samples[("edgefl_bytes_received_total", ())] == sum(federation.bytes_per_round)
    assert samples[("edgefl_updates_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("edgefl_broker_connected", ())] == 1
    last = federation.chained[-1]
    assert samples[("edgefl_last_round_duration_seconds", ())] == pytest.approx(last.duration_s)
    assert samples[("edgefl_last_round_metric", (("name", "train_accuracy"),))] == pytest.approx(
        _expected_metric(ROUNDS - 1, 1))


def test_healthz_follows_the_broker_link(federation: Federation, mosquitto: Broker) -> None:
    # Execute / Assert: healthy while connected, 503 once the broker is gone
    assert _get(federation.status.url + "healthz")[::2] == (200, "ok\n")
    mosquitto.stop()
    deadline = time.monotonic() + 15
    while federation.transport.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    code, _, body = _get(federation.status.url + "healthz")
    assert code == 503 and "disconnected" in body
    assert _get(federation.status.url + "no-such-page")[0] == 404


def test_status_page_renders_in_headless_chromium(federation: Federation, tmp_path: Path) -> None:
    # Prepare
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run scripts/install_chromium.sh "
                    "(apt-get install chromium)")
    command = [
        CHROMIUM if Path(CHROMIUM).exists() else "chromium", "--headless", "--no-sandbox",
        "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000", "--dump-dom", federation.status.url,
    ]

    # Execute
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)

    # Assert: the values and chart elements exist only if the page's script fetched and drew
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert f'<span id="federation">{FED}</span>' in dom
    assert f'<span id="round">{ROUNDS}</span>' in dom
    assert f'<span id="rounds">{ROUNDS}</span>' in dom
    assert '<b id="connected">connected</b>' in dom
    assert re.search(r'<span id="error"></span>', dom), "the page reported a fetch error"
    bytes_chart = re.search(r'<svg id="chart-bytes".*?</svg>', dom, re.S)
    assert bytes_chart and len(re.findall(r'<rect [^>]*class="bar"', bytes_chart[0])) == ROUNDS
    for chart in ("chart-accuracy", "chart-loss"):
        svg = re.search(rf'<svg id="{chart}".*?</svg>', dom, re.S)
        assert svg, chart
        assert svg[0].count('class="line"') == 1
        assert len(re.findall(r'<circle [^>]*class="point"', svg[0])) == ROUNDS
    assert "<td>malformed</td><td>1</td>" in dom
    assert "<td>dev-a</td>" in dom and "<td>dev-c</td>" not in dom
