"""The receive window: a burst larger than it is held back by the broker, not dropped, and our
own publishes still get their PUBACK while it is full (real Mosquitto, real paho)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import transport.mqtt as mqtt_module
from transport.broker import Broker
from transport.mqtt import Message, MqttTransport

BURST = 12


def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _reader(broker: Broker, **window: int) -> MqttTransport:
    reader = MqttTransport(broker.host, broker.port, "reader", persistent_session=True,
                           manual_ack=True, **window)
    reader.start()
    reader.subscribe("burst/#")
    time.sleep(0.2)  # the SUBACK: nothing below is published before the subscription holds
    return reader


def _publish_burst(broker: Broker, count: int = BURST, size: int = 3_000) -> MqttTransport:
    writer = MqttTransport(broker.host, broker.port, "writer")
    writer.start()
    for i in range(count):
        writer.publish(f"burst/{i}", bytes([i]) * size)
    return writer


def _drain(reader: MqttTransport, count: int) -> list[Message]:
    """Receive and acknowledge until `count` messages came (or 10 s pass)."""
    got: list[Message] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        message = reader.receive(0.2)
        if message is not None:
            got.append(message)
            reader.ack(message)
    return got


def test_a_burst_beyond_the_window_waits_at_the_broker_and_all_of_it_arrives(
        mosquitto: Broker) -> None:
    reader = _reader(mosquitto, window_bytes=10_000, window_messages=100)
    writer = _publish_burst(mosquitto)  # 36,000 bytes against a 10,000-byte window
    # Unacknowledged, the reader holds only what fits: 3 messages, the rest stays unread
    assert _wait(lambda: reader.held == (3, 9_000))
    time.sleep(0.5)
    assert reader.held == (3, 9_000) and reader.inbox.qsize() == 3 and reader.pauses >= 1
    # Acknowledging makes room: every message arrives, once, in order
    got = _drain(reader, BURST)
    assert [m.topic for m in got] == [f"burst/{i}" for i in range(BURST)]
    assert [m.payload[0] for m in got] == list(range(BURST))
    assert reader.held == (0, 0)
    writer.stop()
    reader.stop()


def test_the_window_also_counts_messages(mosquitto: Broker) -> None:
    reader = _reader(mosquitto, window_bytes=10**9, window_messages=2)
    writer = _publish_burst(mosquitto, size=10)
    assert _wait(lambda: reader.held[0] == 2)
    time.sleep(0.5)
    assert reader.held[0] == 2
    assert len(_drain(reader, BURST)) == BURST
    writer.stop()
    reader.stop()


def test_a_message_larger_than_the_window_still_gets_in_alone(mosquitto: Broker) -> None:
    reader = _reader(mosquitto, window_bytes=1_000)
    writer = _publish_burst(mosquitto, count=3)
    got = _drain(reader, 3)
    assert len(got) == 3 and all(len(m.payload) == 3_000 for m in got)
    writer.stop()
    reader.stop()


def test_publishing_with_a_full_window_does_not_deadlock(
        mosquitto: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    # The broker's PUBACK for our publish comes behind the messages held back; a reader that
    # did not read on while publishing would wait for it until the ack timeout.
    monkeypatch.setattr(mqtt_module, "ACK_TIMEOUT_S", 5.0)
    reader = _reader(mosquitto, window_bytes=10_000)
    writer = _publish_burst(mosquitto)
    assert _wait(lambda: reader.held == (3, 9_000))
    started = time.monotonic()
    reader.publish("elsewhere/global", b"x" * 1_000, qos=1, retain=True)  # raises on timeout
    assert time.monotonic() - started < 4.0
    got = _drain(reader, BURST)
    assert len(got) == BURST and len({m.topic for m in got}) == BURST
    writer.stop()
    reader.stop()


def test_without_manual_acks_receiving_frees_the_window(mosquitto: Broker) -> None:
    reader = MqttTransport(mosquitto.host, mosquitto.port, "auto-reader", window_bytes=10_000)
    reader.start()
    reader.subscribe("burst/#")
    time.sleep(0.2)
    writer = _publish_burst(mosquitto)
    got = [m for _ in range(BURST) if (m := reader.receive(5)) is not None]
    assert len(got) == BURST and reader.held == (0, 0)
    writer.stop()
    reader.stop()


def test_stop_returns_while_the_network_thread_waits_for_room(mosquitto: Broker) -> None:
    reader = _reader(mosquitto, window_bytes=10_000)
    writer = _publish_burst(mosquitto)
    assert _wait(lambda: reader.held == (3, 9_000))
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 5.0
    writer.stop()


@pytest.mark.parametrize("window", [dict(window_bytes=0), dict(window_messages=0),
                                    dict(window_bytes=-1)])
def test_a_window_that_is_not_positive_is_refused(window: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="window"):
        MqttTransport("127.0.0.1", 1, "nowhere", **window)
