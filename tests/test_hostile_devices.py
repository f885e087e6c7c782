"""Hostile devices against the real gateway path (Mosquitto + Coordinator): none can speak for
another, outweigh the round, or crash-loop the aggregator; their problems are counted."""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import zstandard

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from protocol import codec, topics
from protocol.messages import Update
from tests.test_round_aggregators import FED, MANIFEST, ZERO, _full
from transport.broker import Broker
from transport.mqtt import MqttTransport


def _wait(condition, seconds: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def gateway(mosquitto: Broker, tmp_path: Path) -> Iterator[tuple[Coordinator, MqttTransport]]:
    """A running coordinator (2 updates a round, weight cap 100) and a device-side client."""
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-hostile", persistent_session=True,
                        manual_ack=True)
    agg.start()
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=2, min_clients=2,
                              round_deadline_s=60, max_samples=100)
    coordinator = Coordinator(config, MANIFEST, ZERO, agg, GlobalStore(tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=coordinator.run, args=(stop.is_set,), daemon=True)
    thread.start()
    # run() subscribes before it publishes the first global: after that, nothing is missed
    assert _wait(lambda: coordinator.global_bytes > 0)
    device = MqttTransport(mosquitto.host, mosquitto.port, "hostile-device")
    device.start()
    yield coordinator, device
    stop.set()
    thread.join(10)
    device.stop()
    agg.stop()


def test_a_device_cannot_mark_another_offline(gateway: tuple[Coordinator, MqttTransport]) -> None:
    coordinator, device = gateway
    device.publish(topics.status_topic(FED, "b"), codec.encode_status(True, "b"), qos=1)
    assert _wait(lambda: "b" in coordinator.snapshot().online)
    # A, from its own status topic, says B went offline: the topic decides who speaks
    device.publish(topics.status_topic(FED, "a"), codec.encode_status(False, "b"), qos=1)
    assert _wait(lambda: coordinator.snapshot().rejections.get("status-mismatch") == 1)
    assert "b" in coordinator.snapshot().online


def test_a_device_with_other_artifacts_is_counted_once(
        gateway: tuple[Coordinator, MqttTransport]) -> None:
    coordinator, device = gateway
    for _ in range(3):  # the retained status arrives again on every reconnect
        device.publish(topics.status_topic(FED, "old"),
                       codec.encode_status(True, "old", problem="manifest"), qos=1)
    device.publish(topics.status_topic(FED, "ok"), codec.encode_status(True, "ok"), qos=1)
    assert _wait(lambda: "ok" in coordinator.snapshot().online)
    assert coordinator.snapshot().rejections.get("manifest") == 1


def _update(device: str, value: float, samples: int) -> bytes:
    return codec.encode_update(Update(FED, 0, device, MANIFEST.sha256, samples,
                                      uuid.uuid4().hex, _full(value)))


def _with_header(payload: bytes, **changes: object) -> bytes:
    """The same update with header fields replaced (re-framed as a valid, checksummed frame)."""
    raw = zstandard.ZstdDecompressor().decompress(payload)
    tensors = safetensors.numpy.load(raw)
    # safetensors' own layout: an 8-byte length, then the JSON header with __metadata__
    (size,) = struct.unpack("<Q", raw[:8])
    metadata = dict(json.loads(raw[8:8 + size])["__metadata__"])
    header = json.loads(metadata["header"])
    header.update(changes)
    metadata["header"] = json.dumps(header)
    body = safetensors.numpy.save(tensors, metadata=metadata)
    return zstandard.ZstdCompressor(write_checksum=True).compress(body)


def test_hostile_headers_are_rejected_and_the_round_still_closes(
        gateway: tuple[Coordinator, MqttTransport]) -> None:
    coordinator, device = gateway
    base = _update("x", 9.0, 10)
    hostile = [  # each of these once crashed the aggregator in a loop (never acknowledged)
        _with_header(base, update_id="\ud800"),
        _with_header(base, num_samples=2**70),
        _with_header(base, num_samples=10**400),
        _with_header(base, metrics={"loss": 10**400}),
    ]
    for payload in hostile:
        device.publish(topics.update_topic(FED, "x"), payload, qos=1)
    # the honest device claims its true 100 samples, the liar the most the protocol allows;
    # both weigh at most --max-samples (100): (1·100 + 3·100) / 200 = 2
    device.publish(topics.update_topic(FED, "honest"), _update("honest", 1.0, 100), qos=1)
    device.publish(topics.update_topic(FED, "liar"), _update("liar", 3.0, 2**31 - 1), qos=1)
    assert _wait(lambda: coordinator.snapshot().finished)
    assert sum(coordinator.snapshot().rejections.values()) == len(hostile)
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [2.0, 2.0])


def test_an_unwritable_state_over_a_real_broker_loses_nothing(mosquitto: Broker,
                                                              tmp_path: Path) -> None:
    # Prepare: the state refuses every write (as a full disk does) while two updates arrive
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-disk", persistent_session=True,
                        manual_ack=True)
    agg.start()
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=2, min_clients=2,
                              round_deadline_s=60)
    coordinator = Coordinator(config, MANIFEST, ZERO, agg, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    assert _wait(lambda: coordinator.global_bytes > 0)
    device = MqttTransport(mosquitto.host, mosquitto.port, "disk-device")
    device.start()
    store.db.execute("PRAGMA query_only = 1")
    device.publish(topics.update_topic(FED, "a"), _update("a", 1.0, 10), qos=1)
    device.publish(topics.update_topic(FED, "b"), _update("b", 3.0, 10), qos=1)
    time.sleep(2.0)
    # Assert: still running, nothing counted; then writable again, both count exactly once
    assert thread.is_alive() and store.accepted_count(0) == 0
    store.db.execute("PRAGMA query_only = 0")
    thread.join(30)
    assert not thread.is_alive() and store.accepted_count(0) == 2
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [2.0, 2.0])
    device.stop()
    agg.stop()


def test_a_long_federation_over_a_real_broker_keeps_its_state_bounded(
        mosquitto: Broker, tmp_path: Path) -> None:
    # fedmedian keeps every update's adapter; with --keep-rounds 2 only recent rounds stay
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-bounded", persistent_session=True,
                        manual_ack=True)
    agg.start()
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=6, clients_per_round=2, min_clients=2,
                              round_deadline_s=60, strategy="fedmedian", keep_rounds=2)
    coordinator = Coordinator(config, MANIFEST, ZERO, agg, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    device = MqttTransport(mosquitto.host, mosquitto.port, "bounded-device")
    device.start()
    for round_number in range(6):
        assert _wait(lambda r=round_number: coordinator.round == r and coordinator.global_bytes)
        for name in ("a", "b"):
            update = Update(FED, round_number, name, MANIFEST.sha256, 10, uuid.uuid4().hex,
                            _full(float(round_number)))
            device.publish(topics.update_topic(FED, name), codec.encode_update(update), qos=1)
        assert _wait(lambda r=round_number: coordinator.round > r)
    thread.join(30)
    assert store.history() == [4, 5, 6]  # the final global and the two rounds before it
    assert store.accepted_adapters(2) == [] and len(store.accepted_adapters(5)) == 2
    device.stop()
    agg.stop()
