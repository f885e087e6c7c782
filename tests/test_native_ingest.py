"""The native ingest worker (aggregator/native, `edgefl aggregator --workers N --worker-kind
native`) against the Python IngestWorker it replaces: the same updates through the real CLI and a
real Mosquitto give the same rejection counts, the same partial sum to the bit and the same
global, which is the FedAvg of the accepted updates worked out here from the formula."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from aggregator.store import DB_FILE, GlobalStore
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import Update
from tests.test_group_commit import _wait, accepted_count
from tests.test_workers import _ready, _rejected
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent
MAX_SAMPLES = 1000  # --max-samples: one update below claims more, and must weigh this much


def _mixed(artifacts: Path, federation: str
           ) -> tuple[list[tuple[dict[str, np.ndarray], float]], list[tuple[str, bytes]]]:
    """Updates for round 0 of `federation`, valid and hostile in turn: the (full adapter,
    weight) pairs the round must average, and every (topic, payload) in sending order."""
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(11)  # the same tensors for every federation name

    def adapter(scale: float = 1.0) -> dict[str, np.ndarray]:
        return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
                for k, v in initial.items()}

    def update(device: str, samples: int, tensors: dict[str, np.ndarray], **fields: object
               ) -> Update:
        base: dict[str, object] = {"federation": federation, "round": 0, "device_id": device,
                                   "manifest_sha256": manifest.sha256, "num_samples": samples,
                                   "update_id": f"{device}-{uuid.uuid4().hex[:12]}",
                                   "adapter": tensors}
        return Update(**{**base, **fields})  # type: ignore[arg-type]

    def message(u: Update, device: str | None = None) -> tuple[str, bytes]:
        return topics.update_topic(federation, device or u.device_id), codec.encode_update(u)

    full, delta = adapter(), adapter(0.01)
    d0 = update("d0", 100, full, metrics={"loss": 0.5, "accuracy": 0.25})
    d1 = update("d1", 300, delta, is_delta=True, metrics={"loss": 1.5})
    d2 = update("d2", 50_000, adapter())  # claims more than --max-samples
    d3 = update("d3", 50, adapter())
    nan = adapter()
    nan[min(nan)].flat[3] = np.nan
    missing = adapter()
    del missing[max(missing)]
    sent = [
        message(d0),
        message(d1),
        message(d0),  # redelivered: duplicate
        message(update("d0", 100, adapter())),  # a second update of d0: duplicate-device
        (topics.update_topic(federation, "d5"), b"\x28\xb5\x2f\xfd not a frame"),  # malformed
        message(update("d6", 10, adapter(), federation="elsewhere"), "d6"),  # federation
        message(update("d7", 10, adapter()), "d8"),  # device-mismatch
        message(update("d9", 10, adapter(), manifest_sha256="0" * 64)),  # manifest
        message(update("d10", 10, adapter(), round=1)),  # future-round
        message(update("d11", 10, adapter(), task="t1")),  # task
        message(update("d12", 10, nan)),  # tensors
        message(update("d13", 10, missing)),  # tensors
        message(d2),
        message(d3),  # the last: the round closes on it, after every rejection above
    ]
    d1_full = {k: initial[k] + delta[k] for k in initial}  # float32, as the aggregator adds it
    accepted = [(full, 100.0), (d1_full, 300.0), (d2.adapter, float(MAX_SAMPLES)),
                (d3.adapter, 50.0)]
    return accepted, sent


ACCEPTED_AT = (0, 1, 12, 13)  # where d0, d1, d2 and d3 are in _mixed's sending order
EXPECTED_REJECTIONS = {"duplicate": 1, "duplicate-device": 1, "malformed": 1, "federation": 1,
                       "device-mismatch": 1, "manifest": 1, "future-round": 1, "task": 1,
                       "tensors": 2}


def _one_round(broker: Broker, artifacts: Path, state: Path, federation: str, kind: str,
               sent: list[tuple[str, bytes]]) -> str:
    """`edgefl aggregator --workers 1 --worker-kind <kind>` for one round of 4 updates, fed
    `sent` once its worker has subscribed; its log."""
    leader = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "aggregator", "--host", broker.host,
         "--port", str(broker.port), "--federation", federation, "--artifacts", str(artifacts),
         "--rounds", "1", "--clients-per-round", "4", "--min-clients", "4", "--deadline", "600",
         "--max-samples", str(MAX_SAMPLES), "--state-dir", str(state), "--workers", "1",
         "--worker-kind", kind], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    device = MqttTransport(broker.host, broker.port, f"devices-{federation}")
    device.start()
    try:
        assert _wait(lambda: _ready(state, federation) == 1 or leader.poll() is not None, 60)
        time.sleep(0.5)  # the broker has handled the SUBSCRIBE sent before that row
        for topic, payload in sent:  # one client, QoS 1: the worker gets them in this order
            device.publish(topic, payload)
        leader.wait(90)
    finally:
        device.stop()
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)
    log = leader.stderr.read().decode() if leader.stderr else ""
    assert leader.returncode == 0, log
    return log


def _partial(state: Path, federation: str) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Worker w0's row of round 0 (its totals) and its partial sum, as the store holds them."""
    with sqlite3.connect(state / federation / DB_FILE) as db:
        snapshot, weight, sums, nbytes, count = db.execute(
            "SELECT snapshot, weight, metric_sums, bytes, count FROM partials WHERE round = 0 "
            "AND worker = 'w0'").fetchone()
    from safetensors.numpy import load

    return ({"weight": weight, "metric_sums": json.loads(sums), "bytes": nbytes,
             "count": count}, load(snapshot))


def test_native_and_python_workers_judge_and_sum_alike(
        mosquitto: Broker, cnn_artifacts: Path, native_build: Path, tmp_path: Path) -> None:
    results = {}
    for kind in ("python", "native"):
        federation = f"parity-{kind}"
        accepted, sent = _mixed(cnn_artifacts, federation)
        state = tmp_path / kind
        log = _one_round(mosquitto, cnn_artifacts, state, federation, kind, sent)
        final = GlobalStore(state / federation).global_at(1)
        assert final is not None, log
        totals, sums = _partial(state, federation)
        # The bytes of the 4 accepted payloads (the compressed sizes differ between the two
        # federations' payloads by a byte or so, so each is checked against its own).
        assert totals.pop("bytes") == sum(len(sent[i][1]) for i in ACCEPTED_AT)
        results[kind] = (final, _rejected(state, federation), totals, sums)
    python, native = results["python"], results["native"]
    assert python[1] == native[1] == EXPECTED_REJECTIONS
    # FedAvg from its formula: Σ w_k·x_k / Σ w_k over the 4 accepted updates, with d1's delta
    # added to the global it started from and d2's 50,000 samples capped at MAX_SAMPLES.
    total = sum(w for _, w in accepted)
    assert total == 100 + 300 + MAX_SAMPLES + 50
    for name, value in native[0].items():
        expected = sum(a[name].astype(np.float64) * w for a, w in accepted) / total
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(value, python[0][name])  # the same float32 bits
    # The durable partial sums agree to the bit, and so do their totals: weights, the
    # weighted metric sums (loss 0.5·100 + 1.5·300, accuracy 0.25·100), the count.
    assert native[2] == python[2]
    assert native[2]["metric_sums"] == {"loss": 500.0, "accuracy": 25.0}
    assert native[2]["weight"] == total and native[2]["count"] == 4
    assert set(native[3]) == set(python[3])
    for name in native[3]:
        np.testing.assert_array_equal(native[3][name], python[3][name])



def test_a_native_commit_that_loses_a_race_is_judged_again(
        mosquitto: Broker, cnn_artifacts: Path, native_build: Path, tmp_path: Path) -> None:
    """The two races of aggregator/workers.py, made deterministic by holding SQLite's write
    lock while the worker's commit waits for it: another worker counts the same device first
    (the commit fails on the unique slot index), and the leader closes the round first (the
    commit sees a newer global). Each time the worker goes back to the store's state and judges
    the update again, as the Python worker does."""
    from aggregator.config import AggregatorConfig
    from aggregator.native_workers import command, write_spec

    federation = "nativerace"
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    folder = tmp_path / "state" / federation
    GlobalStore(folder).save(0, initial, {"closed": [], "assignment": {}, "family": {}})
    config = AggregatorConfig(federation=federation, rounds=5, clients_per_round=100,
                              min_clients=1)
    spec = write_spec(folder, 0, config, manifest, mosquitto.host, mosquitto.port)
    worker = subprocess.Popen(command(spec), stderr=subprocess.PIPE)
    device = MqttTransport(mosquitto.host, mosquitto.port, "race-devices")
    device.start()
    db = sqlite3.connect(folder / DB_FILE, isolation_level=None)

    def send(name: str, round_number: int, samples: int = 10) -> None:
        update = Update(federation, round_number, name, manifest.sha256, samples,
                        uuid.uuid4().hex, initial)
        device.publish(topics.update_topic(federation, name), codec.encode_update(update))

    def rejected() -> dict[str, int]:
        row = db.execute("SELECT counts FROM worker_rejections WHERE worker = 'w0'").fetchone()
        return {} if row is None else json.loads(row[0])

    try:
        assert _wait(lambda: _ready(tmp_path / "state", federation) == 1, 30)
        time.sleep(0.5)  # the broker has handled the SUBSCRIBE sent before that row
        # 1. Another worker commits d1 while this one, having judged d1 against the committed
        # state, waits for the lock to commit its own copy.
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO accepted VALUES ('other-worker', 0, 'd1', 10, 10.0, 0, NULL)")
        send("d1", 0)
        time.sleep(1.0)
        db.execute("COMMIT")
        assert _wait(lambda: rejected() == {"duplicate-device": 1}, 30), rejected()
        # 2. The leader stores round 1's global while this worker waits to commit d2 of round 0.
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO globals SELECT 1, adapter, info FROM globals WHERE round = 0")
        send("d2", 0)
        time.sleep(1.0)
        db.execute("COMMIT")
        assert _wait(lambda: rejected() == {"duplicate-device": 1, "stale-round": 1}, 30)
        # 3. It went on in round 1: an update of round 1 counts there.
        send("d3", 1, samples=7)
        assert _wait(lambda: db.execute("SELECT COUNT(*) FROM accepted WHERE round = 1")
                     .fetchone() == (1,), 30)
    finally:
        device.stop()
        worker.terminate()
        worker.wait(10)
    assert worker.returncode == 0, worker.stderr.read().decode() if worker.stderr else ""
    assert db.execute("SELECT update_id FROM accepted WHERE round = 0").fetchall() == \
        [("other-worker",)]
    assert db.execute("SELECT round, weight, count FROM partials WHERE worker = 'w0'").fetchall() \
        == [(1, 7.0, 1)]


def _random_mix(artifacts: Path, federation: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` messages for round 0 of `federation`, drawn (the same for any federation name) from
    valid updates, resends, second updates of a device and the hostile kinds of _mixed, plus
    flipped and cut bytes."""
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(seed)
    sent: list[tuple[str, bytes]] = []
    devices = [f"m{i}" for i in range(n // 3)]  # fewer devices than messages: repeats happen
    for i in range(n):
        device = str(rng.choice(devices))
        tensors = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
        fields: dict[str, object] = {
            "federation": federation, "round": 0, "device_id": device,
            "manifest_sha256": manifest.sha256, "num_samples": int(rng.integers(1, 3000)),
            "update_id": f"{federation}-{i}", "adapter": tensors,
            "metrics": {"loss": float(rng.uniform(0, 3))}, "is_delta": bool(rng.random() < 0.3)}
        kind = rng.choice(["valid"] * 8 + ["resend", "federation", "device", "manifest",
                                           "future", "task", "nan", "shape", "flip", "cut"])
        topic = topics.update_topic(federation, device)
        if kind == "resend" and sent:
            sent.append(sent[int(rng.integers(len(sent)))])
            continue
        if kind == "federation":
            fields["federation"] = "elsewhere"
        elif kind == "device":
            topic = topics.update_topic(federation, device + "x")
        elif kind == "manifest":
            fields["manifest_sha256"] = "f" * 64
        elif kind == "future":
            fields["round"] = 1
        elif kind == "task":
            fields["task"] = "t"
        elif kind == "nan":
            tensors[max(tensors)].flat[int(rng.integers(tensors[max(tensors)].size))] = np.inf
        elif kind == "shape":
            tensors[min(tensors)] = tensors[min(tensors)][:1]
        payload = codec.encode_update(Update(**fields))  # type: ignore[arg-type]
        if kind == "flip":
            at = int(rng.integers(len(payload)))
            payload = payload[:at] + bytes([payload[at] ^ 0x20]) + payload[at + 1:]
        elif kind == "cut":
            payload = payload[: int(rng.integers(len(payload)))]
        sent.append((topic, payload))
    return sent


def test_native_and_python_workers_agree_on_a_random_mix(
        mosquitto: Broker, cnn_artifacts: Path, native_build: Path, tmp_path: Path) -> None:
    n = 90
    results = {}
    for kind in ("python", "native"):
        federation, state = f"mix-{kind}", tmp_path / kind
        sent = _random_mix(cnn_artifacts, federation, n, seed=5)
        leader = subprocess.Popen(
            [sys.executable, "-m", "edgefl", "aggregator", "--host", mosquitto.host,
             "--port", str(mosquitto.port), "--federation", federation, "--artifacts",
             str(cnn_artifacts), "--rounds", "1", "--clients-per-round", "1000",
             "--min-clients", "1000", "--deadline", "600", "--state-dir", str(state),
             "--workers", "1", "--worker-kind", kind],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        device = MqttTransport(mosquitto.host, mosquitto.port, f"devices-{federation}")
        device.start()

        def handled(state: Path = state, federation: str = federation) -> int:
            counted = sum(_rejected(state, federation).values())
            return counted + accepted_count(state, federation)

        try:
            assert _wait(lambda: _ready(state, federation) == 1, 60)  # noqa: B023 (called now)
            time.sleep(0.5)
            for topic, payload in sent:
                device.publish(topic, payload)
            assert _wait(lambda: handled() == n, 60), handled()  # every message judged once
        finally:
            device.stop()
            leader.kill()
            leader.wait(10)
        totals, sums = _partial(state, federation)
        results[kind] = (_rejected(state, federation), {k: v for k, v in totals.items()
                                                        if k != "bytes"}, sums)
    python, native = results["python"], results["native"]
    assert native[0] == python[0], (native[0], python[0])
    assert len(python[0]) >= 8 and python[1]["count"] >= 20  # the mix did mix
    assert native[1] == python[1]
    for name in python[2]:
        np.testing.assert_array_equal(native[2][name], python[2][name])


def test_native_and_python_workers_open_signed_frames_alike(
        mosquitto: Broker, cnn_artifacts: Path, native_build: Path, tmp_path: Path) -> None:
    """Hostile frames against the signing registry: unsigned, cut, another device's frame on
    this device's topic, a bad signature, a device the registry does not hold. The native
    worker (its registry file given in its spec) and the Python IngestWorker (in-process, the
    same registry) count the same reasons, and both accept the one good frame."""
    from aggregator.config import AggregatorConfig
    from aggregator.native_workers import command, write_spec
    from aggregator.workers import IngestWorker
    from protocol.signing import (
        generate_signing_key,
        public_key_bytes,
        registry_from_json,
        registry_to_json,
        sign_payload,
    )
    from tests.test_round_aggregators import Message
    from tests.test_storage_faults import QueueTransport

    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    keys = {d: generate_signing_key() for d in ("d1", "d2", "d3")}
    registry_file = tmp_path / "registry.json"  # d3 signs, but is not enrolled
    registry_file.write_text(registry_to_json({d: public_key_bytes(keys[d]) for d in ("d1", "d2")}))

    def frames(federation: str) -> list[tuple[str, bytes]]:
        def payload(device: str) -> bytes:
            return codec.encode_update(Update(federation, 0, device, manifest.sha256, 10,
                                              f"{federation}-{device}-{uuid.uuid4().hex[:8]}",
                                              initial))

        def topic(device: str) -> str:
            return topics.update_topic(federation, device)

        good = sign_payload(keys["d1"], "d1", payload("d1"))
        bad = sign_payload(keys["d2"], "d2", payload("d2"))
        return [
            (topic("d2"), payload("d2")),  # signature-unsigned
            (topic("d2"), bad[:40]),  # signature-malformed-frame
            (topic("d2"), good),  # d1's frame on d2's topic: signature-device-mismatch
            (topic("d2"), bad[:-1] + bytes([bad[-1] ^ 1])),  # signature-bad-signature
            (topic("d3"), sign_payload(keys["d3"], "d3", payload("d3"))),  # unknown-device
            (topic("d1"), good),  # accepted
        ]

    expected = {"signature-unsigned": 1, "signature-malformed-frame": 1,
                "signature-device-mismatch": 1, "signature-bad-signature": 1,
                "signature-unknown-device": 1}
    # Python, in-process.
    config = AggregatorConfig(federation="signed-py", rounds=1, clients_per_round=10,
                              min_clients=1)
    python = IngestWorker(config, manifest, initial, QueueTransport(),
                          GlobalStore(tmp_path / "py"), worker="w0",
                          registry=registry_from_json(registry_file.read_text()))
    for topic, frame in frames("signed-py"):
        assert python.handle(Message(topic, frame))
    assert dict(python.rejections) == expected
    assert GlobalStore(tmp_path / "py").accepted_count(0) == 1
    # Native, over the broker.
    federation = "signed-native"
    folder = tmp_path / "native" / federation
    GlobalStore(folder).save(0, initial, {"closed": [], "assignment": {}, "family": {}})
    spec = write_spec(folder, 0, replace(config, federation=federation), manifest,
                      mosquitto.host, mosquitto.port, signing_registry=registry_file)
    worker = subprocess.Popen(command(spec), stderr=subprocess.DEVNULL)
    device = MqttTransport(mosquitto.host, mosquitto.port, "signed-devices")
    device.start()
    try:
        assert _wait(lambda: _ready(tmp_path / "native", federation) == 1, 30)
        time.sleep(0.5)
        for topic, frame in frames(federation):
            device.publish(topic, frame)
        assert _wait(lambda: accepted_count(tmp_path / "native", federation) == 1
                     and _rejected(tmp_path / "native", federation) == expected, 30), \
            _rejected(tmp_path / "native", federation)
    finally:
        device.stop()
        worker.terminate()
        worker.wait(10)
