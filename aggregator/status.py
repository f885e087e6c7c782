"""Gateway status over HTTP: an HTML page, its JSON feed, Prometheus /metrics and /healthz."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from aggregator.snapshot import GatewaySnapshot, RoundSummary

logger = logging.getLogger(__name__)

# A request that sends nothing for this long is dropped, so a stalled client cannot hold a
# handler thread for ever.
REQUEST_TIMEOUT_S = 10.0
_TEXT = "text/plain; charset=utf-8"

# path -> (file under aggregator/static, content type): the page and the only script and style
# it may load.
_ASSETS = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
}

# Scripts and styles only from this server's own files (no inline code, no eval), and the page
# may talk only to this server. JSON goes out with nosniff, so /api/status can never run as a
# script even though it is same-origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Read the page's files from the installed package: path -> (body, content type)."""
    static = resources.files("aggregator").joinpath("static")
    return {path: (static.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in _ASSETS.items()}


def _json_safe(value: Any) -> Any:
    """`value` with tuples as lists and non-finite floats as None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        # Devices report their own metrics; the page would chart garbage.
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _number(family: dict[str, Any], key: str) -> float | None:
    """`family[key]` as a float, or None when absent, None or not a number."""
    value = family.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _Totals:
    """Updates and bytes of every round closed while this server ran, folded from snapshots.

    The coordinator keeps a bounded history; summing it would make the Prometheus counters
    drop once old rounds fall out of it, which scrapers read as a counter reset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # HTTP threads fold concurrently
        self._last_round: int | None = None
        self.updates = 0
        self.bytes = 0

    def fold(self, history: tuple[RoundSummary, ...]) -> tuple[int, int]:
        """Count the rounds of `history` newer than any seen before; return (updates, bytes)."""
        with self._lock:
            # Rounds close in increasing order, so what is new is a suffix of the history.
            new = [h for h in history if self._last_round is None or h.round > self._last_round]
            for summary in new:
                self.updates += len(summary.devices)
                self.bytes += summary.bytes_received
            if new:
                self._last_round = new[-1].round
            return self.updates, self.bytes


class StatusServer:
    """Serves the gateway's state on `http://host:port/` from a daemon thread.

    Routes: `/` (HTML page, with `/status.css` and `/status.js`), `/api/status` (JSON),
    `/metrics` (Prometheus text format) and `/healthz` (200 while the broker link is up, else
    503). Every request reads one fresh snapshot, so each response is consistent in itself.

    Args:
        snapshot: returns the gateway's current state (for example `coordinator.snapshot`);
            called from the HTTP threads, so it must be cheap and thread-safe.
        host: address to bind; the default keeps the page on this machine (it has no auth).
        port: TCP port; 0 picks a free one (see `port` after `start`).
    """

    def __init__(self, snapshot: Callable[[], GatewaySnapshot], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.snapshot = snapshot
        self.host, self._port = host, port
        self._totals = _Totals()
        self.registry = CollectorRegistry(auto_describe=False)  # private: one per server
        self.registry.register(_StatusCollector(self))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> StatusServer:
        """Load the page's files, bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("status server already started")
        # Read once, here: a missing package file fails the start, not a request later.
        assets = _load_assets()
        self._server = _Server((self.host, self._port), _Handler, self, assets)
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

    # -- reading ---------------------------------------------------------------------------
    def state(self, snap: GatewaySnapshot | None = None) -> dict[str, Any]:
        """The JSON served as /api/status, built from `snap` (default: a fresh snapshot)."""
        s = self.snapshot() if snap is None else snap
        accepted, total_bytes = self._totals.fold(s.history)
        return _json_safe({
            "federation": s.federation, "round": s.round, "rounds": s.rounds,
            "finished": s.finished, "mode": s.mode, "strategy": s.strategy,
            "connected": s.connected,
            "open_round": {
                "round": s.open_round, "updates": s.open_updates,
                "bytes_received": s.open_bytes, "clients_per_round": s.clients_per_round,
                "min_clients": s.min_clients,
            },
            "online": sorted(s.online), "rejections": dict(s.rejections),
            "updates_accepted": accepted, "bytes_received": total_bytes,
            "last_round_duration_s": s.history[-1].duration_s if s.history else None,
            "history": [dict(dataclasses.asdict(h), num_devices=len(h.devices))
                        for h in s.history],
            "family": dict(s.family),
            "certificates": dict(s.certificates),
            "role": s.role,
        })


class _StatusCollector(Collector):
    """Reads a fresh snapshot on every scrape, so /metrics never lags the coordinator."""

    def __init__(self, status: StatusServer) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        snap = self.status.snapshot()
        s = self.status.state(snap)
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
        last_metrics = {name: value for name, value in
                        (s["history"][-1]["metrics"] if s["history"] else {}).items()
                        if value is not None}
        if last_metrics:  # families whose devices report no metrics get no empty family
            metrics = GaugeMetricFamily("edgefl_last_round_metric",
                                        "Device-reported metrics of the last closed round, "
                                        "sample-weighted.", labels=["name"])
            for name, value in sorted(last_metrics.items()):
                metrics.add_metric([name], value)
            yield metrics
        yield from _family_metrics(snap.family)
        yield from _certificate_metrics(snap.certificates)
        yield GaugeMetricFamily("edgefl_broker_connected", "1 while the MQTT link is up.",
                                value=int(s["connected"]))


def _family_metrics(family: dict[str, Any]) -> Iterator[Metric]:
    """Gauges for the family facts present: DP's privacy spend, exact's residual."""
    # Read raw (not JSON-made-safe): Prometheus text carries +Inf, e.g. an unbounded budget.
    gauges = (
        ("epsilon", "edgefl_dp_epsilon_spent", "Privacy budget spent so far (epsilon)."),
        ("max_epsilon", "edgefl_dp_epsilon_budget", "Epsilon at which the federation stops."),
        ("residual_rank", "edgefl_residual_rank", "Rank of the exact-aggregation residual."),
        ("truncation_error", "edgefl_residual_truncation_error",
         "Error of truncating the residual to that rank."),
    )
    for key, name, documentation in gauges:
        value = _number(family, key)
        if value is not None:
            yield GaugeMetricFamily(name, documentation, value=value)


def _certificate_metrics(certificates: dict[str, str]) -> Iterator[Metric]:
    """One expiry gauge per TLS certificate identity; unreadable dates are left out."""
    expiry = GaugeMetricFamily("edgefl_certificate_expiry_timestamp_seconds",
                               "When each gateway TLS certificate expires (Unix time).",
                               labels=["identity"])
    for identity, iso in sorted(certificates.items()):
        try:
            when = dt.datetime.fromisoformat(iso)
        except (TypeError, ValueError):
            continue
        if when.tzinfo is None:  # certificate_expiry writes UTC offsets; assume UTC otherwise
            when = when.replace(tzinfo=dt.UTC)
        expiry.add_metric([identity], when.timestamp())
    if expiry.samples:
        yield expiry


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the aggregator process alive

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 status: StatusServer, assets: dict[str, tuple[bytes, str]]) -> None:
        self.status = status
        self.assets = assets
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
            reply = (HTTPStatus.INTERNAL_SERVER_ERROR, _TEXT, b"internal error\n")
        self._send(*reply)

    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        status = self.server.status
        if path in self.server.assets:
            body, content_type = self.server.assets[path]
            return HTTPStatus.OK, content_type, body
        if path == "/api/status":
            body = json.dumps(status.state(), allow_nan=False).encode()
            return HTTPStatus.OK, "application/json", body
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(status.registry)
        if path == "/healthz":
            if status.snapshot().connected:
                return HTTPStatus.OK, _TEXT, b"ok\n"
            return HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, b"broker disconnected\n"
        return HTTPStatus.NOT_FOUND, _TEXT, b"not found\n"

    def _send(self, code: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # On every response, not only the page: a JSON or text body opened directly gets the
        # same lock-down.
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        # http.server writes every request to stderr; scrapes every few seconds belong in debug.
        logger.debug("%s %s", self.address_string(), format % args)
