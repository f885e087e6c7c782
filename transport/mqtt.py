"""Paho-MQTT 2.x client wrapper: waits for the broker, reconnects, resubscribes; inbox; TLS."""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from transport import TransportError

logger = logging.getLogger(__name__)

ACK_TIMEOUT_S = 30.0  # a broker on a loaded 2-core gateway can take seconds to ack a large publish
CONNECT_TIMEOUT_S = 15.0
# The receive window: messages this process holds and is not done with (with manual acks, until
# acknowledged; otherwise until `receive()` hands them out). While it is full the network thread
# stops reading, so the broker keeps the rest: a burst costs the broker's memory, not ours.
# Mosquitto 2.0 honours the Receive Maximum we announce only until our first PUBACK (each one
# then releases a whole new window), so the broker cannot be trusted to bound it for us.
WINDOW_BYTES = 16 * 1024 * 1024  # about 58 MiniLM or 540 CNN fp32 updates
WINDOW_MESSAGES = 256  # also announced to the broker as the MQTT 5 Receive Maximum
MAX_RECEIVE_MAXIMUM = 65_535  # the largest value MQTT 5 allows
KEEPALIVE_S = 30
# Waiting for a broker that is not there yet: the first pause, doubled after each try up to the
# cap, so a gateway or device started before its broker connects soon after it comes up.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 10.0


def _tls_refused(exc: OSError) -> bool:
    """Whether a failed connection is TLS refusing us (wrong CA, certificate, name): waiting
    cannot help. A handshake cut short (EOF) is a broker still starting: that is worth a wait."""
    return isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS connection: the CA that signed the broker, and our client identity.

    `cert` and `key` are optional for brokers that do not ask for client certificates; the
    gateway's broker does (`edgefl gateway init` writes one pair per device).
    """

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")


@dataclass(frozen=True, slots=True)
class Message:
    """One received MQTT message, detached from paho's types."""

    topic: str
    payload: bytes
    retain: bool = False
    mid: int = 0
    qos: int = 0


class MqttTransport:
    """One MQTT v5 connection. Callbacks only enqueue; consumers call `receive()` on their thread.

    Subscriptions are remembered and renewed in `on_connect`, so they survive reconnects (paho
    reconnects by itself with backoff between `reconnect_delay_set` bounds). Received messages
    are held in a window of `window_bytes` and `window_messages`; while it is full, nothing more
    is read from the broker (see `_on_message`). With `manual_ack`, acknowledge every QoS 1
    message exactly once: that is what frees its place.

    Raises:
        ValueError: a window bound that is not positive.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        persistent_session: bool = False,
        session_expiry_s: int = 3600,
        username: str | None = None,
        password: str | None = None,
        mqtt_version: int = 5,
        tls: TlsFiles | None = None,
        manual_ack: bool = False,
        window_bytes: int = WINDOW_BYTES,
        window_messages: int = WINDOW_MESSAGES,
    ) -> None:
        if window_bytes < 1 or window_messages < 1:
            raise ValueError(f"the receive window must be positive, got {window_bytes} bytes "
                             f"and {window_messages} messages")
        self.host, self.port, self.client_id = host, port, client_id
        self.window_bytes, self.window_messages = window_bytes, window_messages
        self._persistent = persistent_session
        self._session_expiry_s = session_expiry_s
        self._v5 = mqtt_version == 5
        self._manual_ack = manual_ack
        if self._v5:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                manual_ack=manual_ack,
            )
        else:  # MQTT 3.1.1, for brokers without v5 (the embedded fallback)
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                clean_session=not persistent_session, manual_ack=manual_ack,
            )
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            # CERT_REQUIRED plus paho's default hostname check: the broker must present a
            # certificate from our CA whose SAN names `host`, or the connection fails.
            self._client.tls_set(
                ca_certs=str(tls.ca),
                certfile=None if tls.cert is None else str(tls.cert),
                keyfile=None if tls.key is None else str(tls.key),
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()  # set by stop(): ends a wait for the broker in start()
        # Bounded by the window: _on_message waits for room before it puts anything here.
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.bytes_sent = 0
        self._window = threading.Condition()  # guards the four counters below
        self._held_messages = 0
        self._held_bytes = 0
        self._publishing = 0  # our QoS 1 publishes waiting for the broker's PUBACK
        self.pauses = 0  # how often the window filled and reading stopped

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, connect_timeout: float | None = None) -> None:
        """Connect and start paho's network thread; wait until the broker accepts us.

        A broker that is not reachable yet is waited for (for ever, or `connect_timeout`
        seconds), so a device or gateway may start before its broker.
        """
        self._closing.clear()
        waited = self._connect_with_retry(connect_timeout)
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self._client.loop_stop()
            raise TransportError(f"broker {self.host}:{self.port} did not accept {self.client_id}")
        if waited:
            # WARNING like the "waiting" line it closes, so both show wherever that one did.
            logger.warning("%s: connected to the broker at %s:%s", self.client_id, self.host,
                           self.port)

    def _connect_with_retry(self, connect_timeout: float | None) -> bool:
        """Open the connection, retrying with capped backoff; True if we had to wait."""
        deadline = None if connect_timeout is None else time.monotonic() + connect_timeout
        delay, waited = FIRST_RETRY_S, False
        while True:
            try:
                self._connect()
                return waited
            except OSError as exc:
                if _tls_refused(exc):
                    raise TransportError(
                        f"TLS with broker {self.host}:{self.port} failed: {exc}") from exc
                if not waited:  # one line for the whole wait, not one per try
                    logger.warning("%s: waiting for the broker at %s:%s: %s", self.client_id,
                                   self.host, self.port, exc)
                    waited = True
                if deadline is not None and time.monotonic() >= deadline:
                    raise TransportError(f"no broker at {self.host}:{self.port} after "
                                         f"{connect_timeout}s: {exc}") from exc
                # Jitter: devices started together do not all knock at the same instant.
                pause = delay * random.uniform(0.5, 1.0)
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                if self._closing.wait(max(pause, 0.0)):
                    raise TransportError(
                        f"{self.client_id}: stopped while waiting for the broker") from exc
                delay = min(delay * 2, MAX_RETRY_S)

    def _connect(self) -> None:
        """One connection attempt (TCP, TLS handshake, CONNECT sent); raises OSError."""
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            # Caps what the broker sends unacknowledged (until its first PUBACK, see above):
            # that bounds what arrives while reading goes on during our own publishes.
            props.ReceiveMaximum = min(self.window_messages, MAX_RECEIVE_MAXIMUM)
            if self._persistent:
                props.SessionExpiryInterval = self._session_expiry_s
            self._client.connect(
                self.host, self.port, keepalive=KEEPALIVE_S,
                clean_start=not self._persistent, properties=props,
            )
        else:
            self._client.connect(self.host, self.port, keepalive=KEEPALIVE_S)

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread (or a wait in start)."""
        self._closing.set()
        with self._window:  # a network thread waiting for room must not hold up loop_stop
            self._window.notify_all()
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._connected.is_set()

    @property
    def held(self) -> tuple[int, int]:
        """(messages, bytes) in the receive window right now."""
        with self._window:
            return self._held_messages, self._held_bytes

    # -- messaging -------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe now, and no longer subscribe after a reconnect."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS >= 1, wait for the broker's ack (reading goes on meanwhile,
        even with a full window: the ack comes behind whatever the broker sent us before it)."""
        if qos == 0:
            self._publish(topic, payload, qos, retain)
            return
        self._set_publishing(+1)
        try:
            self._publish(topic, payload, qos, retain)
        finally:
            self._set_publishing(-1)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Hand the message to paho and, for QoS >= 1, wait for the broker's ack."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            # paho raises RuntimeError from both calls once the link drops mid-wait (it marks
            # the message "not connected"); it still resends it after reconnecting.
            try:
                info.wait_for_publish(timeout=ACK_TIMEOUT_S)
                published = info.is_published()
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish to {topic} failed: {exc}") from exc
            if not published:
                raise TransportError(f"no ack for publish to {topic} within {ACK_TIMEOUT_S}s")
        self.bytes_sent += len(payload)

    def _set_publishing(self, change: int) -> None:
        """Count a publish that starts (+1) or stops (-1) waiting for its PUBACK."""
        with self._window:
            self._publishing += change
            self._window.notify_all()  # a paused network thread must read on to get our PUBACK

    def drop_connection(self) -> None:
        """Cut the TCP connection without an MQTT DISCONNECT, as a lost radio link does.

        The broker publishes our last will; paho notices the dead socket and reconnects.
        """
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already gone
                pass

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS >= 1 message (only with manual_ack=True).

        With manual acks, the broker redelivers any message whose ack never came, for example
        because this process died while handling it; callers ack after their durable write.
        Acknowledging frees the message's place in the receive window.
        """
        if self._held_until_ack(message):
            self._client.ack(message.mid, message.qos)
            self._release(message)

    def receive(self, timeout: float | None = None) -> Message | None:
        """Next received message, or None after `timeout` seconds."""
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if not self._held_until_ack(message):
            self._release(message)
        return message

    def _held_until_ack(self, message: Message) -> bool:
        """Whether `message` stays in the window until acknowledged (not only until received)."""
        return self._manual_ack and message.qos > 0

    def _release(self, message: Message) -> None:
        """Free the window's place of `message` and wake a network thread waiting for room."""
        with self._window:
            self._held_messages -= 1
            self._held_bytes -= len(message.payload)
            self._window.notify_all()

    # -- paho callbacks (network thread: only _on_message waits, and only for the window) ---
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            logger.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            return
        logger.debug("%s connected to %s:%s", self.client_id, self.host, self.port)
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic_filter, qos in subs:
            client.subscribe(topic_filter, qos=qos)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if reason_code != 0:
            logger.warning("%s lost the broker (%s); paho reconnects", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos)
        size = len(message.payload)
        with self._window:
            # Backpressure: waiting here stops paho's network thread, so nothing more is read
            # from the socket and the broker holds the rest (in TCP buffers and its queue).
            if not self._may_take(size):
                self.pauses += 1
                while not self._may_take(size):
                    self._window.wait()
            self._held_messages += 1
            self._held_bytes += size
        self.inbox.put(message)

    def _may_take(self, size: int) -> bool:
        """Whether the network thread may take one more message of `size` bytes (the caller
        holds the window's lock)."""
        fits = self._held_messages == 0 or (  # an empty window takes one, however large
            self._held_messages < self.window_messages
            and self._held_bytes + size <= self.window_bytes)
        # Our own publish waiting for its PUBACK lifts the pause: that PUBACK is behind these
        # messages in the stream, so holding them back would deadlock the publisher.
        return fits or self._publishing > 0 or self._closing.is_set()
