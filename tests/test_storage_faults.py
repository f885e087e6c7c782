"""A full state disk stops nothing: updates stay unacknowledged until they can be written, then
count exactly once; a message that blows up anywhere in handling is a counted rejection."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from protocol import codec, topics
from protocol.messages import Update
from tests.test_round_aggregators import FED, MANIFEST, ZERO, Message, _full


class QueueTransport:
    """In-memory transport: delivers what the test puts in, records acks and publishes."""

    bytes_sent = 0
    connected = True

    def __init__(self) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def receive(self, timeout: float | None = None) -> Message | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, message: Message) -> None:
        self.acked.append(message.mid)


def _message(mid: int, device: str, value: float, round_number: int = 0) -> Message:
    update = Update(FED, round_number, device, MANIFEST.sha256, 10, uuid.uuid4().hex,
                    _full(value))
    return Message(topics.update_topic(FED, device), codec.encode_update(update), mid)


def test_an_unwritable_state_defers_updates_and_the_round_completes_once_it_is_writable(
        tmp_path: Path) -> None:
    transport = QueueTransport()
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=2, min_clients=2)
    coordinator = Coordinator(config, MANIFEST, ZERO, transport, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    # Every write now fails inside SQLite, as on a full or read-only file system (the
    # coordinator sees the same sqlite3.OperationalError either way).
    store.db.execute("PRAGMA query_only = 1")
    transport.inbox.put(_message(1, "a", 1.0))
    transport.inbox.put(_message(2, "b", 3.0))
    time.sleep(1.0)
    assert thread.is_alive()
    assert transport.acked == [] and coordinator.round == 0  # nothing counted, nothing acked

    store.db.execute("PRAGMA query_only = 0")  # writable again
    thread.join(20)
    assert not thread.is_alive()
    assert sorted(transport.acked) == [1, 2]
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [2.0, 2.0])
    assert store.accepted_count(0) == 2


def test_an_exception_inside_a_family_is_a_counted_rejection_not_a_crash(tmp_path: Path) -> None:
    transport = QueueTransport()
    coordinator = Coordinator(AggregatorConfig(federation=FED, rounds=1, clients_per_round=2),
                              MANIFEST, ZERO, transport, GlobalStore(tmp_path))

    class Exploding:
        def add(self, contribution: object) -> None:
            raise OverflowError("int too large to convert")

    real = coordinator.aggregator
    coordinator.aggregator = Exploding()  # type: ignore[assignment]
    assert coordinator.handle(_message(1, "a", 1.0)) is True  # handled: acknowledge it
    assert coordinator.rejections == {"invalid": 1}
    coordinator.aggregator = real
    assert coordinator.handle(_message(2, "a", 1.0)) is True
    assert list(coordinator.open.reported) == ["a"]  # the failed one left no trace
