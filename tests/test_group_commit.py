"""Group commit and backpressure at the gateway: many updates per transaction, each acknowledged
only once the transaction that holds it committed; a burst larger than the receive window is
ingested whole; a SIGKILL in the middle of a burst loses and doubles nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import DB_FILE, GlobalStore
from aggregator.strategies import fedavg
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, Update
from tests.test_round_aggregators import FED, MANIFEST, ZERO, Message, _full
from tests.test_storage_faults import QueueTransport
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent


def _wait(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def _update(device: str, value: float, round_number: int = 0) -> tuple[str, bytes]:
    """(update id, payload) of a toy update whose every entry is `value`."""
    update = Update(FED, round_number, device, MANIFEST.sha256, 10, uuid.uuid4().hex,
                    _full(value))
    return update.update_id, codec.encode_update(update)


class CheckingTransport(QueueTransport):
    """Records, at each ack, whether a second connection already sees the update committed."""

    def __init__(self, database: Path, ids: dict[int, str]) -> None:
        super().__init__()
        self.database, self.ids = database, ids
        self.acked_before_commit: list[int] = []

    def ack(self, message: Message) -> None:
        with sqlite3.connect(self.database) as reader:
            committed = reader.execute("SELECT 1 FROM accepted WHERE update_id = ?",
                                       (self.ids[message.mid],)).fetchone()
        if committed is None:
            self.acked_before_commit.append(message.mid)
        super().ack(message)


def test_a_burst_commits_in_groups_and_each_ack_follows_its_commit(tmp_path: Path) -> None:
    ids: dict[int, str] = {}
    transport = CheckingTransport(tmp_path / DB_FILE, ids)
    for mid in range(1, 41):  # all waiting before the loop starts, as after a burst
        ids[mid], payload = _update(f"d{mid}", float(mid))
        transport.inbox.put(Message(topics.update_topic(FED, f"d{mid}"), payload, mid))
    store = GlobalStore(tmp_path)
    commits: list[str] = []
    store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=40, min_clients=40)
    coordinator = Coordinator(config, MANIFEST, ZERO, transport, store)
    commits.clear()  # the constructor's initial save

    coordinator.run()

    assert sorted(transport.acked) == list(range(1, 41)) and transport.acked_before_commit == []
    # 40 updates in far fewer transactions than 40 (the round's close is one more)
    assert len(commits) <= 3, commits
    assert store.accepted_count(0) == 40
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [20.5, 20.5])


def test_a_group_gives_a_round_no_more_updates_than_it_waits_for(tmp_path: Path) -> None:
    transport = QueueTransport()
    sent = [_update(f"d{i}", float(i)) for i in range(5)]
    for mid, (_, payload) in enumerate(sent, start=1):
        transport.inbox.put(Message(topics.update_topic(FED, f"d{mid - 1}"), payload, mid))
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=3, min_clients=3)
    coordinator = Coordinator(config, MANIFEST, ZERO, transport, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()

    # Round 0 closes on the first three; the other two arrive in round 1, for round 0
    assert _wait(lambda: coordinator.round == 1 and len(transport.acked) == 5)
    assert store.accepted_count(0) == 3 and coordinator.rejections == {"stale-round": 2}
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [1.0, 1.0])  # mean of 0, 1, 2
    for mid, device in enumerate(("a", "b", "c"), start=10):
        transport.inbox.put(Message(topics.update_topic(FED, device),
                                    _update(device, 4.0, round_number=1)[1], mid))
    thread.join(20)
    assert not thread.is_alive() and store.accepted_count(1) == 3


def test_duplicates_within_one_group_count_once(tmp_path: Path) -> None:
    transport = QueueTransport()
    _, payload = _update("a", 1.0)
    for mid in (1, 2, 3):  # QoS 1 redeliveries of one update, all in the same group
        transport.inbox.put(Message(topics.update_topic(FED, "a"), payload, mid))
    transport.inbox.put(Message(topics.update_topic(FED, "b"), _update("b", 3.0)[1], 4))
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=2, min_clients=2)
    coordinator = Coordinator(config, MANIFEST, ZERO, transport, store)
    coordinator.run()
    assert coordinator.rejections == {"duplicate": 2} and sorted(transport.acked) == [1, 2, 3, 4]
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [2.0, 2.0])


def test_a_burst_larger_than_the_window_is_accepted_whole(mosquitto: Broker,
                                                          tmp_path: Path) -> None:
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-burst", persistent_session=True,
                        manual_ack=True, window_messages=4)
    agg.start()
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=60, min_clients=60,
                              round_deadline_s=120)
    coordinator = Coordinator(config, MANIFEST, ZERO, agg, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    assert _wait(lambda: coordinator.global_bytes > 0)
    device = MqttTransport(mosquitto.host, mosquitto.port, "burst-device")
    device.start()
    for i in range(60):  # fifteen times the window, all at once
        device.publish(topics.update_topic(FED, f"d{i}"), _update(f"d{i}", float(i))[1])
    thread.join(60)
    assert not thread.is_alive()
    assert store.accepted_count(0) == 60 and not coordinator.rejections  # every one sent
    assert agg.pauses > 0  # the window did fill: the broker held the rest
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [29.5, 29.5])
    device.stop()
    agg.stop()


def test_the_next_global_goes_out_while_a_burst_fills_the_window(mosquitto: Broker,
                                                                 tmp_path: Path) -> None:
    # A window of 4 messages against 40 updates in one burst: the round closes on 30 of them
    # and its global is published while the window is full again (the broker's PUBACK sits
    # behind the held-back burst), then the other 10 are counted as stale.
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg-window", persistent_session=True,
                        manual_ack=True, window_messages=4)
    agg.start()
    store = GlobalStore(tmp_path)
    config = AggregatorConfig(federation=FED, rounds=2, clients_per_round=30, min_clients=30,
                              round_deadline_s=120)
    coordinator = Coordinator(config, MANIFEST, ZERO, agg, store)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    assert _wait(lambda: coordinator.global_bytes > 0)
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "window-watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))
    device = MqttTransport(mosquitto.host, mosquitto.port, "window-devices")
    device.start()

    for i in range(40):
        device.publish(topics.update_topic(FED, f"d{i}"), _update(f"d{i}", float(i))[1])

    def next_global() -> GlobalModel | None:
        message = watcher.receive(0.5)
        return None if message is None else codec.decode_global(message.payload)

    # Round 1's global comes well within the 30 s a deadlocked publish would wait
    assert _wait(lambda: (g := next_global()) is not None and g.round == 1, 20)
    for i in range(30):
        device.publish(topics.update_topic(FED, f"d{i}"), _update(f"d{i}", 1.0, 1)[1])
    thread.join(30)
    assert not thread.is_alive()
    # Nothing dropped: every update of the burst was accepted or counted as a rejection
    assert store.accepted_count(0) == 30 and store.accepted_count(1) == 30
    assert coordinator.rejections == {"stale-round": 10}
    assert agg.pauses > 0  # the window did fill: the broker held the rest
    np.testing.assert_allclose(coordinator.adapter["head.bias"], [1.0, 1.0])
    for transport in (device, watcher, agg):
        transport.stop()


# -- SIGKILL during group commits, through the real CLI --------------------------------------
KILL_FED = "groupkill"
BURST = 200


def _start(broker: Broker, artifacts: Path, state: Path) -> subprocess.Popen[bytes]:
    # A window of a quarter MiB holds about 8 CNN updates: the burst commits in many groups.
    return subprocess.Popen(
        [sys.executable, "-m", "edgefl", "aggregator", "--host", broker.host,
         "--port", str(broker.port), "--federation", KILL_FED, "--artifacts", str(artifacts),
         "--rounds", "1", "--clients-per-round", str(BURST), "--min-clients", str(BURST),
         "--deadline", "600", "--state-dir", str(state), "--window-mib", "0.25"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def final_global(watcher: MqttTransport, seconds: float) -> GlobalModel | None:
    """The federation's final global as `watcher` receives it, or None within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = watcher.receive(1)
        if message is not None and (model := codec.decode_global(message.payload)).final:
            return model
    return None


def accepted_count(state: Path, federation: str = KILL_FED) -> int:
    """Updates the aggregator of `federation` under `state` has committed."""
    return count_rows(state, federation, "accepted")


def count_rows(state: Path, federation: str, table: str) -> int:
    """Rows of a table of `federation`'s state database under `state` (0 before it has one),
    read over a connection of our own."""
    path = state / federation / DB_FILE
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path) as db:
            (count,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    except sqlite3.OperationalError:  # schema not created yet, or locked for a moment
        return 0
    return int(count)


def burst(artifacts: Path, federation: str, n: int, seed: int
          ) -> tuple[list[Update], list[tuple[str, bytes]]]:
    """`n` round-0 updates of random CNN adapters from distinct devices, and (topic, payload)
    of each, ready to publish."""
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(seed)
    sent = [Update(federation, 0, f"d{i:03d}", manifest.sha256, int(rng.integers(32, 640)),
                   uuid.uuid4().hex,
                   {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()})
            for i in range(n)]
    return sent, [(topics.update_topic(federation, u.device_id), codec.encode_update(u))
                  for u in sent]


def test_sigkill_during_group_commits_loses_and_doubles_nothing(
        mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path) -> None:
    sent, payloads = burst(cnn_artifacts, KILL_FED, BURST, seed=1)
    device = MqttTransport(mosquitto.host, mosquitto.port, "burst-devices")
    device.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "burst-watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(KILL_FED))
    state = tmp_path / "state"
    kills: list[int] = []

    def kill_once_accepted(at_least: int) -> subprocess.Popen[bytes]:
        """SIGKILL as soon as `at_least` updates are committed (the rest are in flight, being
        decoded or committed), then start a fresh aggregator on the same state."""
        assert _wait(lambda: accepted_count(state) >= at_least or proc.poll() is not None, 60)
        if proc.poll() is not None:  # it finished first (a fast machine): nothing to cut
            return proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills.append(accepted_count(state))
        return _start(mosquitto, cnn_artifacts, state)

    proc = _start(mosquitto, cnn_artifacts, state)
    try:
        assert _wait(lambda: watcher.receive(0.5) is not None, 60)  # round 0 is open
        for topic, payload in payloads:  # the burst, all at once
            device.publish(topic, payload)
        proc = kill_once_accepted(1)
        for topic, payload in payloads[:5]:  # devices resending the same bytes
            device.publish(topic, payload)
        proc = kill_once_accepted(kills[-1] + 1)
        proc = kill_once_accepted(kills[-1] + 30)
        final = final_global(watcher, 60)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        device.stop()
        watcher.stop()

    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert kills and kills[0] < BURST, kills  # at least the first kill cut the burst short
    assert final is not None and final.round == 1
    expected = fedavg([(u.adapter, float(u.num_samples)) for u in sent])
    for name in expected:
        np.testing.assert_allclose(final.adapter[name], expected[name], rtol=1e-6, atol=1e-7)
    assert accepted_count(state) == BURST
    with sqlite3.connect(state / KILL_FED / DB_FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_a_window_that_is_not_a_positive_size_is_one_line(value: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "aggregator", "--federation", "f", "--port", "1",
         "--state-dir", str(tmp_path / "state"), f"--window-mib={value}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgefl: --window-mib must be a positive number")
    assert not (tmp_path / "state").exists()
