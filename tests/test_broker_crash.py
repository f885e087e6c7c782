"""A broker crash loses the updates it queued for the aggregator: devices send theirs again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, RoundRecord
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from protocol import topics
from protocol.codec import decode_update
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from transport.broker import Broker
from transport.mqtt import MqttTransport

FED = "crash"
DEVICES = 2


def _agent(port: int, artifacts: Path, state: Path, index: int) -> DeviceAgent:
    private, parts = device_partitions(DEVICES, alpha=1.0, seed=3)
    data = private.subset(parts[index])
    device_id = f"dev{index}"
    transport = MqttTransport("127.0.0.1", port, device_id, will=DeviceAgent.will(FED, device_id))
    return DeviceAgent(device_id, FED, make_trainer("onnxruntime", artifacts), data.x, data.y,
                       transport, state, seed=index)


def _aggregator(port: int, artifacts: Path, state: Path) -> tuple[Coordinator, MqttTransport]:
    """The gateway's aggregator, connected: persistent session, manual acks, quick republish."""
    manifest = load_manifest(artifacts)
    transport = MqttTransport("127.0.0.1", port, "agg", persistent_session=True, manual_ack=True)
    transport.start()
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=DEVICES,
                              min_clients=DEVICES, round_deadline_s=300, republish_s=1.0,
                              train=TrainConfig(local_steps=3))
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    return Coordinator(config, manifest, initial, transport, GlobalStore(state)), transport


def _run(coordinator: Coordinator, stop: threading.Event,
         records: list[RoundRecord]) -> threading.Thread:
    thread = threading.Thread(target=lambda: records.extend(coordinator.run(stop.is_set)),
                              daemon=True)
    thread.start()
    return thread


def _receive(observer: MqttTransport, count: int, timeout_s: float) -> list[bytes]:
    payloads = []
    while len(payloads) < count:
        message = observer.receive(timeout_s)
        assert message is not None, f"saw {len(payloads)} of {count} messages"
        payloads.append(message.payload)
    return payloads


def open_round_then_leave(artifacts: Path, tmp_path: Path) -> tuple[Broker, MqttTransport]:
    """A persisting broker (as a gateway's) with round 0's global retained, and the aggregator
    gone, its persistent session kept; the observer returned is subscribed to the updates."""
    broker = Broker(prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
    observer = MqttTransport("127.0.0.1", broker.port, "observer")
    observer.start()
    observer.subscribe(topics.global_topic(FED))
    coordinator, agg = _aggregator(broker.port, artifacts, tmp_path / "agg")
    stop, records = threading.Event(), []
    first = _run(coordinator, stop, records)
    _receive(observer, 1, 30)  # round 0 is open
    stop.set()
    first.join(10)
    agg.stop()
    observer.subscribe(topics.update_filter(FED))
    return broker, observer


@contextmanager
def broker_crashed_aggregator_back(
    broker: Broker, artifacts: Path, tmp_path: Path,
) -> Iterator[tuple[Coordinator, list[RoundRecord], threading.Thread]]:
    """Kill the broker before it saves anything (its queue and retained global are lost),
    bring it back on the same port, and restart the aggregator from its store; yields the
    coordinator, its round records and the thread running it."""
    port = broker.port
    broker.kill()
    broker = Broker(port=port, prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
    coordinator, agg = _aggregator(port, artifacts, tmp_path / "agg")
    stop, records = threading.Event(), []
    thread = _run(coordinator, stop, records)
    try:
        yield coordinator, records, thread
    finally:
        stop.set()
        thread.join(10)
        agg.stop()
        broker.stop()


def test_updates_lost_in_a_broker_crash_are_sent_again(cnn_artifacts: Path,
                                                       tmp_path: Path) -> None:
    # Prepare: a persisting broker (as a gateway's), the aggregator subscribed with its
    # persistent session and round 0's global retained; then the aggregator goes away
    broker, observer = open_round_then_leave(cnn_artifacts, tmp_path)
    port = broker.port
    # The devices train round 0 and publish: the broker queues both updates for the aggregator
    agents = [_agent(port, cnn_artifacts, tmp_path / "dev", i) for i in range(DEVICES)]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    updates = [decode_update(p) for p in _receive(observer, DEVICES, 60)]
    observer.stop()

    # Execute: the broker dies before saving anything (its queue and retained global are lost),
    # comes back on the same port, and the aggregator restarts from its store
    with broker_crashed_aggregator_back(broker, cnn_artifacts, tmp_path) as (coordinator,
                                                                             records, second):
        second.join(60)
        for thread in threads:
            thread.join(30)

    # Assert: round 0 closed with each device's one update, counted once; the devices finished
    assert [r.devices for r in records] == [("dev0", "dev1")], "round 0 never closed"
    assert records[0].samples == sum(u.num_samples for u in updates)
    assert all(coordinator.store.is_accepted(u.update_id) for u in updates)
    assert [a.rounds_trained for a in agents] == [1, 1]
    assert not any(thread.is_alive() for thread in threads)
    assert all(a.pending is None and not a.pending_path.exists() for a in agents)
