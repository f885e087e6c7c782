"""MQTT transport: the only package that imports paho, plus a broker launcher for demos and tests.

`Transport` is the seam the aggregator and devices depend on; importing this package does not
import paho (only transport.mqtt does).
"""

from __future__ import annotations

from typing import Protocol


class Received(Protocol):
    """A received message."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class TransportError(RuntimeError):
    """The broker could not be reached or did not acknowledge in time."""


class Transport(Protocol):
    """Publish, subscribe, and pull received messages from an inbox."""

    bytes_sent: int

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...

    def receive(self, timeout: float | None = None) -> Received | None: ...

    def ack(self, message: Received) -> None: ...
