"""The aggregator against a real Mosquitto: bad updates are rejected and logged, never counted."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import zstandard
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from aggregator.strategies import fedavg
from export.build import ADAPTER_INIT_FILE
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import Update
from tests.conftest import wait_for_round
from transport.broker import Broker
from transport.mqtt import MqttTransport

FED = "fed-test"
START_ROUND = 3  # the store is pre-seeded so the coordinator resumes here


def _adapter_like(initial: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}


def test_rejects_bad_updates_and_averages_good_ones(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a coordinator resumed at round 3, waiting for 2 devices
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    store = GlobalStore(tmp_path / "agg")
    store.save(START_ROUND, initial, {})
    config = AggregatorConfig(federation=FED, rounds=START_ROUND + 1, clients_per_round=2,
                              min_clients=2, round_deadline_s=60,
                              allowed_devices=frozenset({"dev-a", "dev-b", "dev-c"}))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg")
    agg.start()
    coordinator = Coordinator(config, manifest, initial, agg, store)
    assert coordinator.round == START_ROUND
    thread = threading.Thread(target=coordinator.run, daemon=True)

    device = MqttTransport(mosquitto.host, mosquitto.port, "test-device")
    device.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))

    def update(device_id: str, adapter: dict[str, np.ndarray], **kw: object) -> Update:
        fields: dict[str, object] = dict(
            federation=FED, round=START_ROUND, device_id=device_id,
            manifest_sha256=manifest.sha256, num_samples=100, update_id=uuid.uuid4().hex,
            adapter=adapter)
        fields.update(kw)
        return Update(**fields)  # type: ignore[arg-type]

    def send(device_id: str, payload: bytes) -> None:
        device.publish(topics.update_topic(FED, device_id), payload, qos=1)

    good_a, good_b = _adapter_like(initial, 1), _adapter_like(initial, 2)
    nan = _adapter_like(initial, 3)
    nan["head.bias"][0] = np.nan
    wrong_shape = _adapter_like(initial, 4)
    wrong_shape["head.weight"] = np.zeros((3, 3), np.float32)
    first_a = update("dev-a", good_a, num_samples=100)
    other_schema = zstandard.ZstdCompressor(write_checksum=True).compress(safetensors.numpy.save(
        {"x": np.ones(2, np.float32)},
        metadata={"schema": "99", "kind": "update", "header": "{}"}))
    oversized = b"\x28\xb5\x2f\xfd" + bytes(codec.MAX_PAYLOAD_BYTES)
    bad = {
        "malformed": b"\x00garbage",
        "manifest": codec.encode_update(update("dev-c", good_a, manifest_sha256="0" * 64)),
        "tensors": codec.encode_update(update("dev-c", nan)),
        "stale-round": codec.encode_update(update("dev-c", good_a, round=START_ROUND - 1)),
        "future-round": codec.encode_update(update("dev-c", good_a, round=START_ROUND + 1)),
        "federation": codec.encode_update(update("dev-c", good_a, federation="other")),
        "unknown-device": codec.encode_update(update("intruder", good_a)),
        # a task slot (FL-TAC) in a federation that trains one adapter per device
        "task": codec.encode_update(update("dev-c", good_a, task="t0")),
    }
    # Execute: everything goes out in one ordered stream, then the coordinator runs
    thread.start()
    assert watcher.receive(10) is not None  # round 3 opened
    for reason, payload in bad.items():
        send("intruder" if reason == "unknown-device" else "dev-c", payload)
    send("dev-c", other_schema)  # a future schema version
    send("dev-c", oversized)  # over MAX_PAYLOAD_BYTES (the broker's own limit is higher)
    send("dev-b", codec.encode_update(update("dev-c", good_a)))  # dev-c posing as dev-b
    send("dev-c", codec.encode_update(update("dev-c", wrong_shape)))
    send("dev-a", codec.encode_update(first_a))
    send("dev-a", codec.encode_update(first_a))  # QoS 1 redelivery: same update id
    send("dev-a", codec.encode_update(update("dev-a", good_b)))  # second update, same round
    send("dev-b", codec.encode_update(update("dev-b", good_b, num_samples=300)))
    thread.join(30)

    # Assert: one rejection per bad message, and the global is FedAvg of the two good updates
    assert not thread.is_alive()
    assert dict(coordinator.rejections) == {
        "malformed": 3, "manifest": 1, "tensors": 2, "stale-round": 1, "future-round": 1,
        "federation": 1, "unknown-device": 1, "device-mismatch": 1, "duplicate": 1,
        "duplicate-device": 1, "task": 1,
    }
    warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    for reason in ("NaN", "schema version '99'", "exceeds", "unknown-device", "stale-round"):
        assert any("rejected update" in m and reason in m for m in warnings), reason
    expected = fedavg([(good_a, 100.0), (good_b, 300.0)])
    final = None
    while (message := watcher.receive(5)) is not None:
        final = codec.decode_global(message.payload)
        if final.final:
            break
    assert final is not None and final.final and final.round == START_ROUND + 1
    for name in expected:
        np.testing.assert_allclose(final.adapter[name], expected[name], rtol=1e-6, atol=1e-7)
    resumed = store.latest()
    assert resumed is not None and resumed[0] == START_ROUND + 1
    np.testing.assert_allclose(resumed[1]["head.weight"], expected["head.weight"], rtol=1e-6)
    for transport in (agg, device, watcher):
        transport.stop()


def test_deadline_closes_round_with_quorum(mosquitto: Broker, cnn_artifacts: Path,
                                           tmp_path: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    clock = [0.0]
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=3, min_clients=1,
                              round_deadline_s=10)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-deadline")
    agg.start()
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path),
                              now=lambda: clock[0])
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    device = MqttTransport(mosquitto.host, mosquitto.port, "dev-only")
    device.start()
    adapter = _adapter_like(initial, 7)
    device.publish(topics.update_topic(FED, "dev-only"), codec.encode_update(Update(
        FED, 0, "dev-only", manifest.sha256, 50, "u1", adapter)), qos=1)
    thread.join(2)
    assert thread.is_alive(), "one of three devices must not close the round before the deadline"
    clock[0] = 11.0
    thread.join(10)
    assert not thread.is_alive()
    latest = GlobalStore(tmp_path).latest()
    assert latest is not None and latest[0] == 1
    np.testing.assert_allclose(latest[1]["head.bias"], adapter["head.bias"], rtol=1e-6)
    agg.stop()
    device.stop()


def test_async_mode_buffers_k_updates_and_discounts_stale_ones(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: FedBuff with a buffer of 2 and updates up to 1 version old
    manifest = load_manifest(cnn_artifacts)
    g0 = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=2, min_clients=2,
                              round_deadline_s=60, mode="async", max_staleness=1)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-async")
    agg.start()
    coordinator = Coordinator(config, manifest, g0, agg, GlobalStore(tmp_path))
    device = MqttTransport(mosquitto.host, mosquitto.port, "async-devices")
    device.start()
    a = {i: _adapter_like(g0, 10 + i) for i in range(5)}

    def send(device_id: str, round_number: int, adapter: dict, n: int) -> None:
        device.publish(topics.update_topic(FED, device_id), codec.encode_update(Update(
            FED, round_number, device_id, manifest.sha256, n, uuid.uuid4().hex, adapter)))

    watcher = MqttTransport(mosquitto.host, mosquitto.port, "async-watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    assert watcher.receive(10) is not None  # subscribed and version 0 is out

    # Execute: version 1 from two fresh updates; version 2 from one stale and one fresh
    send("d0", 0, a[0], 100)
    send("d1", 0, a[1], 300)
    wait_for_round(coordinator, 1, 20)
    g1 = dict(coordinator.adapter)
    send("d2", 0, a[2], 200)  # one version stale: counts at 1/sqrt(2)
    send("d3", 1, a[3], 200)
    thread.join(20)

    # Assert: FedBuff (Nguyen et al. 2022, Alg. 1) -- x += η_g · Σ s(τ_k)·Δ_k / K with K = 2,
    # s(τ) = 1/sqrt(1+τ), no sample weights; so the stale delta counts 1/sqrt(2) and the sum is
    # still divided by 2 (not by 1 + 1/sqrt(2)).
    assert not thread.is_alive()
    s1 = 1 / np.sqrt(2)
    for name in g0:
        expected_g1 = g0[name] + ((a[0][name] - g0[name]) + (a[1][name] - g0[name])) / 2
        np.testing.assert_allclose(g1[name], expected_g1, rtol=1e-5, atol=1e-6)
        expected_g2 = g1[name] + (s1 * (a[2][name] - g0[name]) + (a[3][name] - g1[name])) / 2
        np.testing.assert_allclose(coordinator.adapter[name], expected_g2, rtol=1e-5, atol=1e-5)
    for transport in (agg, device, watcher):
        transport.stop()
