"""Gateway status over HTTP: an HTML page, its JSON feed, Prometheus /metrics and /healthz."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from protocol.tensors import TensorDict

if TYPE_CHECKING:  # the coordinator imports nothing from here; avoid a cycle at run time
    from aggregator.coordinator import Coordinator, RoundRecord

logger = logging.getLogger(__name__)

# One entry per closed round; a gateway running ten thousand rounds keeps the newest only, so
# the page and its JSON stay small. Totals on /metrics count every round regardless.
MAX_HISTORY_ROUNDS = 1000
REFRESH_MS = 3000  # how often the page polls /api/status
# A request that sends nothing for this long is dropped, so a stalled client cannot hold a
# handler thread for ever.
REQUEST_TIMEOUT_S = 10.0
SNAPSHOT_RETRIES = 5
_TEXT = "text/plain; charset=utf-8"

T = TypeVar("T")

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .6em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin-bottom:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.6em}
.charts{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em}
figcaption{font-weight:600;margin-bottom:.3em}
svg.chart{width:360px;height:160px}
.bar{fill:#4a7fb5}.line{fill:none;stroke:#c0504d;stroke-width:2}.point{fill:#c0504d}
.axis{stroke:#999}.tick{font-size:10px;fill:#555}.empty{font-size:12px;fill:#999}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.2em .6em}
#error{color:#b00}.muted{color:#777}
"""

# Built only with textContent and createElementNS: device ids come from devices' own status
# messages, so nothing received is ever parsed as HTML.
_SCRIPT = """
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) {
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(3);
}
function chart(id, rounds, values, kind, lo, hi) {
  const svg = $(id);
  svg.replaceChildren();
  const W = 360, H = 160, L = 44, R = 8, T = 10, B = 22;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = rounds.map((r, i) => ({r: r, i: i, v: values[i]}))
    .filter((p) => typeof p.v === "number" && Number.isFinite(p.v));
  if (!pts.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
                       "no rounds yet"));
    return;
  }
  if (lo === null) lo = Math.min(0, ...pts.map((p) => p.v));
  if (hi === null) hi = Math.max(...pts.map((p) => p.v));
  if (hi <= lo) hi = lo + 1;
  const step = (W - L - R) / rounds.length;
  const x = (i) => L + (i + 0.5) * step;
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: L - 4, y: T + 8, "text-anchor": "end", class: "tick"}, fmt(hi)));
  svg.appendChild(el("text", {x: L - 4, y: H - B, "text-anchor": "end", class: "tick"}, fmt(lo)));
  for (const i of new Set([0, rounds.length - 1])) {
    svg.appendChild(el("text", {x: x(i), y: H - 6, "text-anchor": "middle", class: "tick"},
                       "r" + rounds[i]));
  }
  if (kind === "bar") {
    for (const p of pts) {
      const bar = el("rect", {x: x(p.i) - 0.35 * step, width: 0.7 * step, y: y(p.v),
                              height: Math.max(0, y(lo) - y(p.v)), class: "bar"});
      bar.appendChild(el("title", {}, `round ${p.r}: ${p.v}`));
      svg.appendChild(bar);
    }
    return;
  }
  svg.appendChild(el("polyline", {points: pts.map((p) => `${x(p.i)},${y(p.v)}`).join(" "),
                                  class: "line"}));
  for (const p of pts) {
    const dot = el("circle", {cx: x(p.i), cy: y(p.v), r: 3, class: "point"});
    dot.appendChild(el("title", {}, `round ${p.r}: ${p.v.toFixed(4)}`));
    svg.appendChild(dot);
  }
}
function fill(id, items) {
  const box = $(id);
  box.replaceChildren();
  for (const cells of items) {
    const row = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      row.appendChild(td);
    }
    box.appendChild(row);
  }
}
function render(s) {
  $("federation").textContent = s.federation;
  $("round").textContent = s.round;
  $("rounds").textContent = s.rounds;
  $("state").textContent = s.finished ? "finished" :
    `collecting ${s.open_round.updates}/${s.open_round.clients_per_round} updates`;
  $("connected").textContent = s.connected ? "connected" : "DISCONNECTED";
  $("online-count").textContent = s.online.length;
  $("accepted").textContent = s.updates_accepted;
  $("rejected").textContent = Object.values(s.rejections).reduce((a, b) => a + b, 0);
  $("bytes").textContent = fmt(s.bytes_received);
  fill("online", s.online.map((d) => [d]));
  fill("rejections", Object.entries(s.rejections).sort().map(([k, v]) => [k, v]));
  const rounds = s.history.map((h) => h.round);
  const metric = (name) => s.history.map((h) => h.metrics[name]);
  chart("chart-bytes", rounds, s.history.map((h) => h.bytes_received), "bar", 0, null);
  chart("chart-accuracy", rounds, metric("train_accuracy"), "line", 0, 1);
  chart("chart-loss", rounds, metric("train_loss"), "line", 0, null);
  $("updated").textContent = new Date().toLocaleTimeString();
  $("error").textContent = "";
}
async function refresh() {
  try {
    const response = await fetch("api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    $("error").textContent = "status unavailable: " + e.message;
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
""".replace("REFRESH_MS", str(REFRESH_MS))

_PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgefl aggregator</title><style>{_STYLE}</style></head>
<body>
<h1>edgefl aggregator &middot; federation <span id="federation">&ndash;</span></h1>
<div class="cards">
<div class="card">round<b><span id="round">&ndash;</span> / <span id="rounds">&ndash;</span></b>
<span id="state" class="muted"></span></div>
<div class="card">broker<b id="connected">&ndash;</b></div>
<div class="card">devices online<b id="online-count">&ndash;</b></div>
<div class="card">updates accepted<b id="accepted">&ndash;</b></div>
<div class="card">updates rejected<b id="rejected">&ndash;</b></div>
<div class="card">bytes received<b id="bytes">&ndash;</b></div>
</div>
<div class="charts">
<figure><figcaption>bytes received per round</figcaption>
<svg id="chart-bytes" class="chart"></svg></figure>
<figure><figcaption>train accuracy (device-reported)</figcaption>
<svg id="chart-accuracy" class="chart"></svg></figure>
<figure><figcaption>train loss (device-reported)</figcaption>
<svg id="chart-loss" class="chart"></svg></figure>
</div>
<h2>rejections by reason</h2><table><tbody id="rejections"></tbody></table>
<h2>devices online</h2><table><tbody id="online"></tbody></table>
<p class="muted">updated <span id="updated">never</span> <span id="error"></span></p>
<script>{_SCRIPT}</script>
</body></html>
""".encode()


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


# Only this page's own inline script and style may run, and it may talk only to this server.
_CSP = (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


def _finite(value: float) -> float | None:
    # Devices report their own metrics; JSON has no NaN, and the page would chart garbage.
    return value if math.isfinite(value) else None


def _copy(read: Callable[[], T]) -> T:
    """Copy a collection the coordinator thread may be changing; retry if it changed mid-copy."""
    for _ in range(SNAPSHOT_RETRIES - 1):
        try:
            return read()
        except RuntimeError:  # "changed size during iteration"
            time.sleep(0)
    return read()


class StatusServer:
    """Serves the coordinator's state on `http://host:port/` from a daemon thread.

    Routes: `/` (HTML page), `/api/status` (JSON), `/metrics` (Prometheus text format) and
    `/healthz` (200 while the broker link is up, else 503). Round history is what `record`
    received, so it covers the rounds closed since this server started; call `attach()` to have
    the coordinator feed it.

    Args:
        coordinator: the running coordinator; only read, from the HTTP threads.
        host: address to bind; the default keeps the page on this machine (it has no auth).
        port: TCP port; 0 picks a free one (see `port` after `start`).
    """

    def __init__(self, coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.coordinator = coordinator
        self.host, self._port = host, port
        self._lock = threading.Lock()
        self._history: deque[dict[str, Any]] = deque(maxlen=MAX_HISTORY_ROUNDS)
        self._accepted = 0
        self._bytes = 0
        self._last_duration_s: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)  # private: one per server
        self.registry.register(_StatusCollector(self))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> StatusServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("status server already started")
        self._server = _Server((self.host, self._port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http",
                                        daemon=True)
        self._thread.start()
        logger.info("status page on http://%s:%d/", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the chosen one when constructed with port 0)."""
        if self._server is None:
            raise RuntimeError("status server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the page, ending in '/'."""
        return f"http://{self.host}:{self.port}/"

    # -- feeding ---------------------------------------------------------------------------
    def record(self, record: RoundRecord) -> None:
        """Add one closed round to the history and totals (call from any thread)."""
        entry = {
            "round": record.round, "devices": list(record.devices),
            "num_devices": len(record.devices), "samples": record.samples,
            "bytes_received": record.bytes_received, "duration_s": record.duration_s,
            "metrics": {k: _finite(float(v)) for k, v in record.metrics.items()},
            "closed_at": time.time(),
        }
        with self._lock:
            self._history.append(entry)
            self._accepted += len(record.devices)
            self._bytes += record.bytes_received
            self._last_duration_s = record.duration_s

    def attach(self) -> None:
        """Chain `record` in front of the coordinator's existing `on_round` callback."""
        previous = self.coordinator.on_round

        def on_round(record: RoundRecord, adapter: TensorDict) -> None:
            self.record(record)
            if previous is not None:
                previous(record, adapter)

        self.coordinator.on_round = on_round

    # -- reading ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The state served as /api/status: plain JSON-ready data, copied, safe to keep."""
        c = self.coordinator
        open_round = c.open  # replaced, not mutated in place, when a round closes
        online = _copy(lambda: sorted(set(c.online)))
        rejections = _copy(lambda: dict(c.rejections))
        with self._lock:
            history = [dict(h, devices=list(h["devices"]), metrics=dict(h["metrics"]))
                       for h in self._history]
            accepted, total_bytes, last = self._accepted, self._bytes, self._last_duration_s
        return {
            "federation": c.config.federation, "round": c.round, "rounds": c.config.rounds,
            "finished": c.round >= c.config.rounds, "mode": c.config.mode,
            "strategy": c.config.strategy, "connected": bool(c.transport.connected),
            "open_round": {
                "round": open_round.round, "updates": len(open_round.reported),
                "bytes_received": open_round.bytes,
                "clients_per_round": c.config.clients_per_round,
                "min_clients": c.config.min_clients,
            },
            "online": online, "rejections": rejections, "updates_accepted": accepted,
            "bytes_received": total_bytes, "last_round_duration_s": last, "history": history,
        }


class _StatusCollector(Collector):
    """Reads a fresh snapshot on every scrape, so /metrics never lags the coordinator."""

    def __init__(self, status: StatusServer) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status.snapshot()
        yield GaugeMetricFamily("edgefl_round", "Round now open (equals rounds when finished).",
                                value=s["round"])
        yield GaugeMetricFamily("edgefl_rounds_target", "Rounds the federation runs for.",
                                value=s["rounds"])
        yield GaugeMetricFamily("edgefl_devices_online",
                                "Devices whose last status message said online.",
                                value=len(s["online"]))
        yield GaugeMetricFamily("edgefl_open_round_updates",
                                "Updates accepted so far in the open round.",
                                value=s["open_round"]["updates"])
        yield CounterMetricFamily("edgefl_updates_accepted",
                                  "Updates aggregated in rounds closed since start.",
                                  value=s["updates_accepted"])
        yield CounterMetricFamily("edgefl_bytes_received",
                                  "Update payload bytes in rounds closed since start.",
                                  value=s["bytes_received"])
        rejected = CounterMetricFamily("edgefl_updates_rejected", "Rejected updates by reason.",
                                       labels=["reason"])
        for reason, count in sorted(s["rejections"].items()):
            rejected.add_metric([reason], count)
        yield rejected
        if s["last_round_duration_s"] is not None:
            yield GaugeMetricFamily("edgefl_last_round_duration_seconds",
                                    "Wall time of the last closed round.",
                                    value=s["last_round_duration_s"])
        if s["history"]:
            metrics = GaugeMetricFamily("edgefl_last_round_metric",
                                        "Device-reported metrics of the last closed round, "
                                        "sample-weighted.", labels=["name"])
            for name, value in sorted(s["history"][-1]["metrics"].items()):
                if value is not None:
                    metrics.add_metric([name], value)
            yield metrics
        yield GaugeMetricFamily("edgefl_broker_connected", "1 while the MQTT link is up.",
                                value=int(s["connected"]))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the aggregator process alive

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 status: StatusServer) -> None:
        self.status = status
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edgefl-status"
    sys_version = ""  # do not advertise the Python version
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        try:
            reply = self._route(path)
        except Exception:  # a bug in one route must not kill the server thread
            logger.exception("status request %s failed", path)
            reply = (HTTPStatus.INTERNAL_SERVER_ERROR, _TEXT, b"internal error\n", {})
        self._send(*reply)

    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes, dict[str, str]]:
        status = self.server.status
        if path == "/":
            return HTTPStatus.OK, "text/html; charset=utf-8", _PAGE, {
                "Content-Security-Policy": _CSP}
        if path == "/api/status":
            body = json.dumps(status.snapshot(), allow_nan=False).encode()
            return HTTPStatus.OK, "application/json", body, {}
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(status.registry), {}
        if path == "/healthz":
            if status.coordinator.transport.connected:
                return HTTPStatus.OK, _TEXT, b"ok\n", {}
            return HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, b"broker disconnected\n", {}
        return HTTPStatus.NOT_FOUND, _TEXT, b"not found\n", {}

    def _send(self, code: HTTPStatus, content_type: str, body: bytes,
              headers: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        # http.server writes every request to stderr; scrapes every few seconds belong in debug.
        logger.debug("%s %s", self.address_string(), format % args)
