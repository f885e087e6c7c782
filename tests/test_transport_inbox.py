"""The MQTT inbox is bounded in bytes, so a burst cannot exhaust the gateway's memory."""

from __future__ import annotations

import time

import pytest

import transport.mqtt as mqtt_module
from transport.broker import Broker
from transport.mqtt import MqttTransport


def test_burst_beyond_the_byte_bound_is_dropped_and_counted(
    mosquitto: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mqtt_module, "INBOX_MAX_BYTES", 10_000)
    reader = MqttTransport(mosquitto.host, mosquitto.port, "reader")
    reader.start()
    reader.subscribe("burst/#")
    writer = MqttTransport(mosquitto.host, mosquitto.port, "writer")
    writer.start()
    time.sleep(0.2)
    for i in range(8):
        writer.publish(f"burst/{i}", bytes(3_000))  # 24,000 bytes against a 10,000-byte bound
    deadline = time.monotonic() + 10
    while reader.dropped + reader.inbox.qsize() < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    kept = [reader.receive(1) for _ in range(reader.inbox.qsize())]
    assert len(kept) == 3 and reader.dropped == 5
    # Draining frees the budget: the next message fits again
    writer.publish("burst/after", bytes(3_000))
    after = reader.receive(5)
    assert after is not None and after.topic == "burst/after"
    writer.stop()
    reader.stop()
