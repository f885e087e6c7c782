"""SIGKILL the aggregator process mid-round, restart it: nothing lost, nothing counted twice."""

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
from safetensors.numpy import load_file

from aggregator.store import DB_FILE
from aggregator.strategies import fedavg
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, Update
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent
FED = "restart"
DEVICES = 6


def _start(broker: Broker, artifacts: Path, state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefl", "aggregator", "--host", broker.host,
         "--port", str(broker.port), "--federation", FED, "--artifacts", str(artifacts),
         "--rounds", "2", "--clients-per-round", str(DEVICES), "--min-clients", str(DEVICES),
         "--deadline", "600", "--state-dir", str(state)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _accepted(state: Path, round_number: int) -> int:
    path = state / FED / DB_FILE
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM accepted WHERE round = ?",
                                  (round_number,)).fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return 0
    return int(count)


def _wait(predicate, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _next_global(watcher: MqttTransport, round_number: int) -> GlobalModel:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = watcher.receive(1)
        if message is not None:
            decoded = codec.decode_global(message.payload)
            if decoded.round == round_number:
                return decoded
    raise AssertionError(f"no global for round {round_number}")


def test_sigkill_and_restart_loses_and_doubles_nothing(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: six devices' updates per round, with different sample counts
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(0)

    def updates(round_number: int) -> list[Update]:
        return [Update(FED, round_number, f"d{i}", manifest.sha256, int(rng.integers(32, 640)),
                       uuid.uuid4().hex,
                       {k: rng.standard_normal(v.shape).astype(np.float32)
                        for k, v in initial.items()})
                for i in range(DEVICES)]

    device = MqttTransport(mosquitto.host, mosquitto.port, "devices")
    device.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))

    def send(update: Update) -> None:
        device.publish(topics.update_topic(FED, update.device_id), codec.encode_update(update))

    state = tmp_path / "state"
    proc = _start(mosquitto, cnn_artifacts, state)
    try:
        _next_global(watcher, 0)
        # Round 0: kill after the first durable accept; the rest arrive while it is down
        round0 = updates(0)
        for update in round0[:3]:
            send(update)
        _wait(lambda: _accepted(state, 0) >= 1)
        _kill(proc)
        for update in round0[3:]:
            send(update)
        send(round0[1])  # a QoS 1 redelivery of an update that may already be counted
        proc = _start(mosquitto, cnn_artifacts, state)
        global1 = _next_global(watcher, 1)

        # Round 1: kill while it is busy with a burst, twice
        round1 = updates(1)
        for update in round1[:4]:
            send(update)
        _kill(proc)
        proc = _start(mosquitto, cnn_artifacts, state)
        for update in round1[4:]:
            send(update)
        time.sleep(0.05)
        _kill(proc)
        proc = _start(mosquitto, cnn_artifacts, state)
        final = _next_global(watcher, 2)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            _kill(proc)
        device.stop()
        watcher.stop()

    # Assert: each round equals FedAvg of exactly its six updates, each counted once
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert final.final
    for got, sent in ((global1, round0), (final, round1)):
        expected = fedavg([(u.adapter, float(u.num_samples)) for u in sent])
        for name in expected:
            np.testing.assert_allclose(got.adapter[name], expected[name], rtol=1e-6, atol=1e-7)
    assert _accepted(state, 0) == DEVICES and _accepted(state, 1) == DEVICES
