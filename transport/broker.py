"""Start an MQTT broker on a free loopback port: Mosquitto when installed, else embedded amqtt."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 10.0
# Mosquitto refuses larger publishes with a clear disconnect; keep it in step with the codec's
# MAX_PAYLOAD_BYTES plus headroom, so an oversized update is the aggregator's call, not a drop.
MESSAGE_SIZE_LIMIT_BYTES = 16 * 1024 * 1024


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until something accepts connections on (host, port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


def _raise_file_limit() -> None:
    """One file descriptor per client: let the broker open as many as the hard limit allows
    (large emulated fleets), not just the soft default of 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bridge_conf(name: str, host: str, port: int, topic_lines: tuple[str, ...],
                tls: tuple[Path, Path, Path] | None = None) -> str:
    """Mosquitto bridge lines for a gateway broker under an upstream broker (docs/DEPLOY.md):
    the given `topic` lines (protocol.topics.bridge_topics), and a persistent bridge session so
    that nothing is lost while the link is down. With `tls` (CA, certificate, key: an identity
    the upstream broker knows), the bridge connects over TLS and checks the upstream's name."""
    secure = "" if tls is None else (f"bridge_cafile {tls[0]}\nbridge_certfile {tls[1]}\n"
                                     f"bridge_keyfile {tls[2]}\n")
    return (f"\nconnection {name}\naddress {host}:{port}\nremote_clientid bridge-{name}\n"
            "cleansession false\n" + secure + "".join(f"topic {line}\n" for line in topic_lines))


class Broker:
    """A running broker; `kind` says which one. Use as a context manager."""

    host = "127.0.0.1"
    #: MQTT protocol version clients should speak: amqtt implements 3.1.1 only.
    mqtt_version = 5

    def __init__(self, port: int | None = None, prefer: str = "mosquitto",
                 persistence_dir: Path | None = None, bridge: str = "") -> None:
        """Start on `port` (default: a free one). With `persistence_dir`, Mosquitto keeps
        sessions, queued QoS 1 messages and retained messages there across restarts. `bridge`
        holds Mosquitto bridge lines (bridge_conf) to an upstream broker."""
        self.port = port or free_port()
        self.bridge = bridge
        self.persistence_dir = persistence_dir
        if persistence_dir is not None:
            Path(persistence_dir).mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="edgefl-broker-")
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if prefer == "mosquitto" and mosquitto:
            self.kind = "mosquitto"
            self._start_mosquitto(mosquitto)
        else:
            self.kind = "amqtt (embedded Python broker)"
            self.mqtt_version = 4  # paho's MQTTv311
            self._start_amqtt()
        wait_for_port(self.host, self.port, STARTUP_TIMEOUT_S)
        logger.info("broker %s listening on %s:%d", self.kind, self.host, self.port)

    def _start_mosquitto(self, binary: str) -> None:
        conf = Path(self._tmp.name) / "mosquitto.conf"
        persistence = (f"persistence true\npersistence_location {self.persistence_dir}/\n"
                       if self.persistence_dir else "persistence false\n")
        if self.persistence_dir and os.geteuid() == 0:
            # Started as root, Mosquitto drops to its own user, which cannot write a folder
            # under root's 0700 temporary directories: it would then persist nothing, silently.
            # This launcher serves loopback tests and demos, so it keeps root instead.
            persistence += "user root\n"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            f"{persistence}"
            f"message_size_limit {MESSAGE_SIZE_LIMIT_BYTES}\n"
            "max_queued_messages 10000\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
            + self.bridge
        )
        self._log = open(Path(self._tmp.name) / "mosquitto.log", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self._log, stderr=self._log,
                                      preexec_fn=_raise_file_limit)

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker as AmqttBroker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            broker = AmqttBroker(config, loop=self._loop)
            self._loop.run_until_complete(broker.start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(broker.shutdown())

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(STARTUP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the broker and remove its temporary files."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._log.close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
        self._tmp.cleanup()

    def kill(self) -> None:
        """Kill Mosquitto at once (SIGKILL), as a power cut would: it saves nothing; clean up."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        self.stop()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
