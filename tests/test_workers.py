"""Worker processes on one broker (aggregator.workers): partial sums folded durably by several
workers merge into exactly the round one aggregator would close; races between workers and with
the leader's close are settled by the shared state database; a SIGKILLed worker loses nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.status import StatusServer
from aggregator.store import DB_FILE, GlobalStore
from aggregator.tiers import GatewayMerger, GatewayTier
from aggregator.workers import IngestWorker, MergingLeader
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import Update
from tests.test_gateway_security import gateway_dir  # noqa: F401 - fixture
from tests.test_group_commit import _wait, accepted_count, burst, count_rows, final_global
from tests.test_hierarchy import assert_fedavg, stop_all
from tests.test_round_aggregators import FED, MANIFEST, ZERO, Message, _full
from tests.test_storage_faults import QueueTransport
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent


def _config(**fields: object) -> AggregatorConfig:
    base: dict[str, object] = {"federation": FED, "rounds": 3, "clients_per_round": 3,
                               "min_clients": 3}
    return AggregatorConfig(**{**base, **fields})  # type: ignore[arg-type]


def _gateway(folder: Path, workers: int = 2, **fields: object
             ) -> tuple[MergingLeader, list[IngestWorker]]:
    """A leader and `workers` workers on one state folder, each with its own connection."""
    config = _config(**fields)
    leader = MergingLeader(config, MANIFEST, ZERO, QueueTransport(), GlobalStore(folder),
                           workers=workers)
    return leader, [IngestWorker(config, MANIFEST, ZERO, QueueTransport(), GlobalStore(folder),
                                 worker=f"w{i}") for i in range(workers)]


def _message(device: str, value: float, samples: int, round_number: int = 0,
             update_id: str | None = None) -> Message:
    update = Update(FED, round_number, device, MANIFEST.sha256, samples,
                    update_id or uuid.uuid4().hex, _full(value))
    return Message(topics.update_topic(FED, device), codec.encode_update(update))


def test_the_leader_merges_the_workers_partial_sums_exactly(tmp_path: Path) -> None:
    leader, (a, b) = _gateway(tmp_path)
    assert a.handle(_message("d1", 1.0, 10))
    assert b.handle(_message("d2", 4.0, 30))
    assert b.handle(_message("d3", -2.0, 20))
    assert leader._round_ready()
    record = leader._close_round()
    # FedAvg by samples: (10·1 + 30·4 + 20·(−2)) / 60 = 90 / 60 = 1.5 in every entry.
    assert record.devices == ("d1", "d2", "d3") and record.samples == 60
    for value in leader.adapter.values():
        np.testing.assert_allclose(value, 1.5, rtol=1e-7)
    stored = GlobalStore(tmp_path).latest()
    assert stored is not None and stored[0] == 1


def test_a_slot_counts_once_whichever_worker_takes_it(tmp_path: Path) -> None:
    leader, (a, b) = _gateway(tmp_path)
    resend = _message("d1", 1.0, 10, update_id="same-id")
    assert a.handle(resend)
    assert b.handle(resend)  # the same bytes redelivered to the other worker
    assert b.handle(_message("d1", 9.0, 10))  # the same device's second, different update
    assert b.rejections == {"duplicate": 1, "duplicate-device": 1}
    assert GlobalStore(tmp_path).accepted_count(0) == 1
    leader._round_ready()
    assert leader.snapshot().rejections == {"duplicate": 1, "duplicate-device": 1}


def test_a_commit_that_loses_the_race_is_handled_again(tmp_path: Path) -> None:
    leader, (a, b) = _gateway(tmp_path, clients_per_round=2, min_clients=1)
    a.handle(_message("d1", 1.0, 10))
    # b folded d1's second update before a committed its first: its commit must fail on the
    # shared slot, and the update be judged again against the stored state.
    b._fold(_message("d1", 2.0, 10))
    group, b._group = b._group, []
    assert b._commit(group)
    assert b.rejections["duplicate-device"] == 1 and b.open.weight == 0
    # b folds d2 for round 0, but the leader closes round 0 before b commits it.
    b._fold(_message("d2", 3.0, 10))
    group, b._group = b._group, []
    leader._round_ready()
    leader._close_round()
    assert b._commit(group)
    assert b.rejections["stale-round"] == 1 and b.round == 1
    np.testing.assert_allclose(leader.adapter["head.bias"], 1.0)  # d1 alone made round 0


def test_a_restarted_worker_resumes_its_partial_sum(tmp_path: Path) -> None:
    leader, (a, _) = _gateway(tmp_path)
    a.handle(_message("d1", 2.0, 10))
    a.handle(_message("d2", 5.0, 20))
    again = IngestWorker(_config(), MANIFEST, ZERO, QueueTransport(), GlobalStore(tmp_path),
                         worker="w0")
    assert again.open.weight == 30
    again.handle(_message("d3", 8.0, 30))
    leader._round_ready()
    leader._close_round()
    # (10·2 + 20·5 + 30·8) / 60 = 360 / 60 = 6
    np.testing.assert_allclose(leader.adapter["fc1.lora_A.weight"], 6.0)


def test_a_restarted_worker_goes_on_counting_its_rejections(tmp_path: Path) -> None:
    leader, (a, _) = _gateway(tmp_path)
    a.handle(_message("d1", 2.0, 10))
    a.handle(Message(topics.update_topic(FED, "d2"), b"not an update"))
    again = IngestWorker(_config(), MANIFEST, ZERO, QueueTransport(), GlobalStore(tmp_path),
                         worker="w0")
    again.handle(_message("d1", 3.0, 10))  # the same device again
    leader._round_ready()
    assert leader.snapshot().rejections == {"malformed": 1, "duplicate-device": 1}


@pytest.mark.parametrize("strategy", ["fedmedian", "trimmed_mean", "exact", "dp-fedavg"])
def test_strategies_that_need_every_update_are_refused(tmp_path: Path, strategy: str) -> None:
    with pytest.raises(ValueError, match="merges partial weighted sums"):
        _gateway(tmp_path, strategy=strategy, clip_norm=1.0, dp_noise_multiplier=1.0,
                 min_clients=3, trim_beta=0.34)


# -- through the real CLI: `edgefl aggregator --workers 2`, a worker SIGKILLed ---------------
KILL_FED = "sharedkill"
BURST = 200


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _ready(state: Path, federation: str = KILL_FED) -> int:
    """How many workers have subscribed (each writes its row in the store once it has)."""
    return count_rows(state, federation, "worker_rejections")


@pytest.mark.parametrize("kind", ["python", "native"])
def test_workers_share_a_round_and_a_killed_worker_loses_nothing(
        mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path, kind: str,
        request: pytest.FixtureRequest) -> None:
    if kind == "native":  # aggregator/native's edgefl-ingest, through the same CLI
        request.getfixturevalue("native_build")
    federation = f"{KILL_FED}{kind}"
    sent, payloads = burst(cnn_artifacts, federation, BURST, seed=2)
    device = MqttTransport(mosquitto.host, mosquitto.port, "shared-devices")
    device.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "shared-watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(federation))
    state = tmp_path / "state"
    leader = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "aggregator", "--host", mosquitto.host,
         "--port", str(mosquitto.port), "--federation", federation, "--artifacts",
         str(cnn_artifacts), "--rounds", "1", "--clients-per-round", str(BURST),
         "--min-clients", str(BURST), "--deadline", "600", "--state-dir", str(state),
         "--window-mib", "0.25", "--workers", "2", "--worker-kind", kind],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed: list[int] = []
    try:
        assert _wait(lambda: watcher.receive(0.5) is not None, 60)  # round 0 is open
        assert _wait(lambda: _ready(state, federation) == 2, 60)  # both workers subscribed
        time.sleep(0.5)  # the broker has handled the SUBSCRIBE sent before that row
        # The victim is frozen first, so it surely holds unacknowledged updates when it dies
        # (a worker that happened to have acknowledged its whole share would prove nothing).
        victim = _children(leader.pid)[0]
        os.kill(victim, signal.SIGSTOP)
        for topic, payload in payloads:
            device.publish(topic, payload)
        for topic, payload in payloads[:10]:  # devices resending the same bytes
            device.publish(topic, payload)
        assert _wait(lambda: accepted_count(state, federation) >= 20, 60)  # the other one works
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        final = final_global(watcher, 90)
        leader.wait(30)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)
        device.stop()
        watcher.stop()
    stderr = leader.stderr.read().decode() if leader.stderr else ""
    assert leader.returncode == 0, stderr
    assert killed and "restarting it" in stderr, stderr
    assert final is not None and final.round == 1
    assert_fedavg(final.adapter, sent)
    with sqlite3.connect(state / federation / DB_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM accepted").fetchone() == (BURST,)
        counts = dict(db.execute("SELECT worker, count FROM partials WHERE round = 0"))
    assert set(counts) == {"w0", "w1"} and min(counts.values()) > 0, counts
    assert sum(counts.values()) == BURST


def test_workers_with_a_strategy_that_cannot_merge_is_one_line(tmp_path: Path,
                                                                 cnn_artifacts: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "aggregator", "--port", "1", "--artifacts",
         str(cnn_artifacts), "--workers", "2", "--strategy", "fedmedian",
         "--state-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fedmedian needs every update of a round" in lines[0], lines


# -- workers on a TLS gateway: an identity each, signed updates, the ACL ---------------------
@pytest.mark.parametrize("kind", ["python", "native"])
def test_workers_on_a_tls_gateway_take_only_signed_updates(
        gateway_dir: Path, cnn_artifacts: Path, tmp_path: Path, kind: str,  # noqa: F811
        request: pytest.FixtureRequest) -> None:
    if kind == "native":
        request.getfixturevalue("native_build")
    from edgefl.gateway import init_gateway, load_gateway
    from protocol.signing import load_private_key, sign_payload
    from tests.test_gateway_security import start_broker, stop_broker
    from transport.broker import free_port

    devices = ["dev-a", "dev-b", "dev-c"]
    files = init_gateway(gateway_dir, devices, port=free_port())
    fed, state = f"tlsworkers{kind}", tmp_path / "state"
    command = [sys.executable, "-m", "edgefl", "aggregator", "--gateway", str(gateway_dir),
               "--federation", fed, "--artifacts", str(cnn_artifacts), "--rounds", "1",
               "--clients-per-round", "3", "--min-clients", "3", "--deadline", "600",
               "--state-dir", str(state), "--workers", "2", "--worker-kind", kind]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode != 0 and "edgefl gateway workers" in refused.stderr
    added = subprocess.run([sys.executable, "-m", "edgefl", "gateway", "workers", "--gateway",
                            str(gateway_dir), "2"], cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=False)
    assert added.returncode == 0, added.stderr
    broker = start_broker(files)
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(4)
    leader = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    files = load_gateway(gateway_dir)
    clients: list[MqttTransport] = []
    try:
        assert _wait(lambda: _ready(state, fed) == 2 or leader.poll() is not None, 60)
        time.sleep(0.5)
        # A device may not join the workers' share group: the ACL gives it no update to read.
        spy = MqttTransport(files.host, files.port, "spy", tls=files.tls_for("dev-c"))
        spy.start()
        clients.append(spy)
        spy.subscribe(topics.shared_update_filter(fed, f"aggregator-{fed}"))
        sent, signed = [], []
        for device in devices:
            transport = MqttTransport(files.host, files.port, device, tls=files.tls_for(device))
            transport.start()
            clients.append(transport)
            adapter = {k: (v + rng.standard_normal(v.shape)).astype(np.float32)
                       for k, v in initial.items()}
            update = Update(fed, 0, device, manifest.sha256, int(rng.integers(32, 640)),
                            uuid.uuid4().hex, adapter)
            payload = codec.encode_update(update)
            topic = topics.update_topic(fed, device)
            transport.publish(topic, payload)  # unsigned: rejected by whichever worker gets it
            key = load_private_key(files.signing_keys[device])
            signed.append((transport, topic, sign_payload(key, device, payload)))
            sent.append(update)
        assert _wait(lambda: _rejected(state, fed) == {"signature-unsigned": 3}, 60)
        for transport, topic, payload in signed:
            transport.publish(topic, payload)
        leader.wait(90)
        assert spy.receive(1) is None
    finally:
        for client in clients:
            client.stop()
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)
        stop_broker(broker)
    stderr = leader.stderr.read().decode() if leader.stderr else ""
    assert leader.returncode == 0, stderr
    final = GlobalStore(state / fed).global_at(1)
    assert final is not None
    assert_fedavg(final, sent)
    assert _rejected(state, fed) == {"signature-unsigned": 3}


def _rejected(state: Path, federation: str) -> dict[str, int]:
    """The workers' rejection counts, added up, as the store holds them."""
    total: dict[str, int] = {}
    try:
        rows = GlobalStore(state / federation).worker_rejections()
    except sqlite3.Error:  # not created yet
        return total
    for counts in rows.values():
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return total


def test_a_worker_that_keeps_dying_is_restarted_with_growing_pauses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aggregator import workers

    clock = [0.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    started: list[float] = []

    def command(index: int) -> list[str]:
        started.append(clock[0])
        return [sys.executable, "-c", "raise SystemExit(3)"]  # dies at once, with an error

    supervisor = workers.Supervisor(command, 1)
    supervisor.start()
    while clock[0] < 20.0:
        supervisor.processes[0].wait()
        supervisor.poll()
        clock[0] += 0.5
    # Polled every 0.5 s. The first death is seen at 0 and waits 1 s: restart at 1.0. Each
    # restart dies at once and is seen at the next poll, 0.5 s later, then waits twice as
    # long as before: seen at 1.5 + 2 = 3.5, seen at 4.0 + 4 = 8.0, seen at 8.5 + 8 = 16.5.
    assert started == [0.0, 1.0, 3.5, 8.0, 16.5]
    assert supervisor.restarts == 4


def test_a_worker_program_that_cannot_start_is_retried_not_fatal(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from aggregator import workers

    clock = [0.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    supervisor = workers.Supervisor(lambda index: ["/nonexistent/edgefl-ingest"], 1)
    supervisor.start()  # no exception: the leader goes on, and tries again
    for _ in range(6):
        supervisor.processes[0].wait()
        clock[0] += 5.0
        supervisor.poll()
    # Polls 5 s apart: each failed start is seen at one poll and, its pause of 1, 2, then 4 s
    # being over, started again at the next: 3 restarts in 6 polls.
    assert supervisor.restarts == 3
    assert "cannot start aggregator worker 0" in caplog.text


def test_the_status_page_names_each_process_role(tmp_path: Path) -> None:
    leader, _ = _gateway(tmp_path / "w", workers=3)
    tier = GatewayTier(_config(), MANIFEST, ZERO, QueueTransport(), GlobalStore(tmp_path / "g"),
                       gateway_id="g7")
    upstream = GatewayMerger(_config(allowed_devices=frozenset({"g7", "g2"})), MANIFEST, ZERO,
                             QueueTransport(), GlobalStore(tmp_path / "u"))
    plain = Coordinator(_config(), MANIFEST, ZERO, QueueTransport(), GlobalStore(tmp_path / "p"))
    native = MergingLeader(_config(), MANIFEST, ZERO, QueueTransport(),
                           GlobalStore(tmp_path / "n"), workers=2, worker_kind="native")
    roles = [StatusServer(c.snapshot, "127.0.0.1", 0).state()["role"]
             for c in (leader, tier, upstream, plain, native)]
    assert roles == ["leader of 3 worker processes", "gateway g7 under an upstream aggregator",
                     "upstream aggregator of gateways g2, g7", "",
                     "leader of 2 native worker processes"]


@pytest.mark.parametrize("kind", ["python", "native"])
def test_workers_carry_a_round_through_a_broker_killed_mid_round(
        cnn_artifacts: Path, tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    # Python workers reconnect by themselves; native ones exit on the lost link and the
    # leader starts them again (their uncommitted updates were never acknowledged).
    if kind == "native":
        request.getfixturevalue("native_build")
    fed, state, n = f"brokerkill{kind}", tmp_path / "state", 40
    sent, payloads = burst(cnn_artifacts, fed, n, seed=6)
    broker = Broker(prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
    port = broker.port
    leader = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "aggregator", "--host", broker.host, "--port",
         str(port), "--federation", fed, "--artifacts", str(cnn_artifacts), "--rounds", "1",
         "--clients-per-round", str(n), "--min-clients", str(n), "--deadline", "600",
         "--state-dir", str(state), "--workers", "2", "--worker-kind", kind],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    clients: list[MqttTransport] = []
    try:
        assert _wait(lambda: _ready(state, fed) == 2, 60)
        time.sleep(0.5)
        device = MqttTransport(broker.host, port, "devices")
        device.start()
        clients.append(device)
        for topic, payload in payloads[: n // 2]:
            device.publish(topic, payload)
        assert _wait(lambda: accepted_count(state, fed) == n // 2, 60)
        broker.kill()  # no clean stop: whatever it had not saved is gone
        broker = Broker(port=port, prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
        assert _wait(lambda: device.connected, 60)  # paho reconnects by itself

        def a_worker_is_back() -> bool:
            # The crash lost the broker's sessions; a worker that has reconnected subscribed
            # again and rejects this probe. (Devices would resend on the next republished global
            # what nobody received meanwhile; this test does not wait for that.)
            device.publish(topics.update_topic(fed, "probe"), b"probe")
            time.sleep(0.1)
            return _rejected(state, fed).get("malformed", 0) > 0

        assert _wait(a_worker_is_back, 60)
        # The devices come back with the rest, and some resend what was already counted.
        for topic, payload in payloads[n // 2:] + payloads[:5]:
            device.publish(topic, payload)
        leader.wait(120)
    finally:
        stop_all(clients, [leader])
        broker.stop()
    stderr = leader.stderr.read().decode() if leader.stderr else ""
    assert leader.returncode == 0, stderr
    final = GlobalStore(state / fed).global_at(1)
    assert final is not None and accepted_count(state, fed) == n
    assert_fedavg(final, sent)
