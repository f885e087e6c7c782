"""The native C++ device (edge_client/native) in real federations over Mosquitto."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent, device_seed
from edge_client.data import LocalTask, device_partitions
from edge_client.native import EXECUTABLE, write_partition
from edge_client.trainer import make_trainer
from edgefl.gateway import GatewayFiles
from protocol import topics
from protocol.codec import decode_status, decode_update, encode_global
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from tests.conftest import retained_statuses, run_rounds
from tests.test_broker_crash import (
    FED,
    _receive,
    broker_crashed_aggregator_back,
    open_round_then_leave,
)
from tests.test_gateway_security import gateway, gateway_dir  # noqa: F401 - fixtures
from transport import Received
from transport.broker import Broker
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent


def native_device(device_id: str, federation: str, artifacts: Path, partition: Path,
                  port: int, state: Path, *extra: str) -> subprocess.Popen[str]:
    """Start one `edgefl-device` process (its log on stdout)."""
    return subprocess.Popen(
        [str(EXECUTABLE), "--id", device_id, "--federation", federation, "--artifacts",
         str(artifacts), "--data", str(partition), "--port", str(port), "--state-dir", str(state),
         "--seed", str(device_seed(device_id)), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _partition(tmp_path: Path, index: int, devices: int) -> Path:
    private, parts = device_partitions(devices, alpha=0.5, seed=1)
    data = private.subset(parts[index])
    return write_partition(tmp_path / f"part{index}.safetensors", [LocalTask("", data.x, data.y)])


@pytest.mark.parametrize(("encoding", "topk"), [("fp32", None), ("int8-channel", 0.5)])
def test_native_and_python_devices_complete_rounds_together(
    native_build: Path, mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path,
    encoding: str, topk: float | None,
) -> None:
    # Prepare: 2 Python devices (ExecuTorch, ONNX Runtime) and 2 native ones on one Mosquitto
    federation, rounds, devices = f"mix-{encoding}", 2, 4
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    private, parts = device_partitions(devices, alpha=0.5, seed=1)
    config = AggregatorConfig(federation=federation, rounds=rounds, clients_per_round=devices,
                              min_clients=devices, round_deadline_s=120,
                              train=TrainConfig(local_steps=5, learning_rate=0.05,
                                                update_encoding=encoding, update_topk=topk))
    agg_transport = MqttTransport(mosquitto.host, mosquitto.port, "aggregator",
                                  persistent_session=True, manual_ack=True)
    agg_transport.start()
    coordinator = Coordinator(config, manifest, initial, agg_transport,
                              GlobalStore(tmp_path / "aggregator"))
    agents = []
    for i, backend in enumerate(("executorch", "onnxruntime")):
        device_id, data = f"py-{backend}", private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, device_id,
                                  will=DeviceAgent.will(federation, device_id))
        agents.append(DeviceAgent(device_id, federation, make_trainer(backend, cnn_artifacts),
                                  data.x, data.y, transport, tmp_path / "py",
                                  seed=device_seed(device_id)))
    natives = [native_device(f"native-{i}", federation, cnn_artifacts,
                             _partition(tmp_path, i, devices), mosquitto.port, tmp_path / "native")
               for i in (2, 3)]

    # Execute
    try:
        records = run_rounds(coordinator, agents, agg_transport)
        outputs = [p.communicate(timeout=60)[0] for p in natives]
    finally:
        for p in natives:
            p.kill()

    # Assert: every round counted all four devices, weighted by their shares; nothing rejected
    assert [r.round for r in records] == list(range(rounds))
    for record in records:
        assert set(record.devices) == {"py-executorch", "py-onnxruntime", "native-2",
                                       "native-3"}, record
        assert record.samples == sum(len(p) for p in parts)
    assert not coordinator.rejections, coordinator.rejections
    assert [p.returncode for p in natives] == [0, 0], outputs
    assert all(f"trained {rounds} rounds" in out for out in outputs), outputs
    statuses = retained_statuses(mosquitto, federation)
    assert statuses["native-2"] is False and statuses["native-3"] is False, statuses
    for i in (2, 3):  # the native device keeps its state in the Python device's format
        assert (tmp_path / "native" / f"native-{i}.json").read_text() == \
            f'{{"last_round":{rounds - 1}}}'
        assert not (tmp_path / "native" / f"native-{i}.pending").exists()


def test_native_device_over_tls_with_signed_updates(
    native_build: Path, gateway: GatewayFiles, cnn_artifacts: Path, tmp_path: Path,  # noqa: F811
) -> None:
    # Prepare: `edgefl gateway init`'s TLS broker and signing registry; dev-a runs natively
    federation = f"sec-{uuid.uuid4().hex[:6]}"
    common = ["--federation", federation, "--gateway", str(gateway.out_dir),
              "--artifacts", str(cnn_artifacts), "--state-dir", str(tmp_path / "state")]
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "-v", "aggregator", *common, "--rounds", "2",
         "--clients-per-round", "2", "--min-clients", "2", "--local-steps", "3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tls = gateway.tls_for("dev-a")
    native = subprocess.Popen(
        [str(EXECUTABLE), "--id", "dev-a", "--federation", federation, "--artifacts",
         str(cnn_artifacts), "--data", str(_partition(tmp_path, 0, 2)), "--host", gateway.host,
         "--port", str(gateway.port), "--ca", str(tls.ca), "--cert", str(tls.cert),
         "--key", str(tls.key), "--signing-key", str(gateway.signing_keys["dev-a"]),
         "--state-dir", str(tmp_path / "native")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    python = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "client", *common, "--device-id", "dev-b", "--index",
         "1", "--num-devices", "2", "--backend", "onnxruntime"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Execute
    try:
        native_out = native.communicate(timeout=180)[0]
        python_out = python.communicate(timeout=60)[0]
        agg_out = aggregator.communicate(timeout=60)[0]
    finally:
        for p in (native, python, aggregator):
            p.kill()

    # Assert: both rounds closed with both devices' signed updates; no rejection at all
    assert aggregator.returncode == 0, agg_out
    assert native.returncode == 0, native_out
    assert python.returncode == 0, python_out
    assert "round 0: 2 devices" in agg_out and "round 1: 2 devices" in agg_out, agg_out
    assert "signature-" not in agg_out and "rejected" not in agg_out, agg_out
    assert "trained 2 rounds" in native_out, native_out


def test_native_device_survives_hostile_globals_and_reports_other_models(
    native_build: Path, mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path,
) -> None:
    # Prepare: an observer plays the aggregator; the device is up before the hostile messages
    federation = "hostile"
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "fake-aggregator")
    agg.start()
    agg.subscribe(topics.update_filter(federation))
    agg.subscribe(topics.status_filter(federation))
    device = native_device("native-0", federation, cnn_artifacts, _partition(tmp_path, 0, 2),
                           mosquitto.port, tmp_path / "state")
    statuses = [decode_status(m.payload) for m in iter(lambda: agg.receive(30), None)
                if "/status/" in m.topic][:1]
    assert statuses and statuses[0].online, "the device never said it is online"
    train = TrainConfig(local_steps=2, update_encoding="int8", update_topk=None)

    def publish_global(message: GlobalModel | bytes) -> None:
        payload = message if isinstance(message, bytes) else encode_global(message)
        agg.publish(topics.global_topic(federation), payload, retain=True)

    valid = encode_global(GlobalModel(federation, 0, manifest.sha256, initial, train))
    wrong_shape = dict(initial, **{next(iter(initial)): np.zeros((3, 3), np.float32)})

    # Execute: garbage, a truncated and a bit-flipped global, a global of another federation,
    # one whose tensors do not fit this model, one for other artifacts, then a valid one
    publish_global(b"not a zstd frame")
    publish_global(valid[: len(valid) // 2])
    publish_global(valid[:40] + bytes([valid[40] ^ 0xFF]) + valid[41:])
    publish_global(GlobalModel("elsewhere", 5, manifest.sha256, initial, train))
    publish_global(GlobalModel(federation, 1, manifest.sha256, wrong_shape, train))
    publish_global(GlobalModel(federation, 2, "0" * 64, initial, train))
    problem = _next(agg, "/status/", 30)
    publish_global(GlobalModel(federation, 3, manifest.sha256, initial, train))
    update = decode_update(_next(agg, "/update/", 60).payload)
    publish_global(GlobalModel(federation, 4, manifest.sha256, initial, train, final=True))
    output = device.communicate(timeout=30)[0]

    # Assert: the device rejected each bad global, said why it could not train on the foreign
    # one, trained on the valid one and stopped at the final global
    assert decode_status(problem.payload).problem == "manifest"
    assert update.round == 3 and update.device_id == "native-0" and update.is_delta
    assert update.manifest_sha256 == manifest.sha256
    assert set(update.adapter) == set(initial)
    assert device.returncode == 0, output
    assert output.count("ignored malformed message") >= 3, output
    assert "cannot set the program up" in output or "skipping" in output, output
    assert "trained 1 rounds" in output, output
    agg.stop()


def _next(transport: MqttTransport, kind: str, timeout_s: float) -> Received:
    """The next message whose topic contains `kind` (others are skipped)."""
    while True:
        message = transport.receive(timeout_s)
        assert message is not None, f"no {kind.strip('/')} message within {timeout_s}s"
        if kind in message.topic:
            return message


def test_native_device_resends_its_update_after_a_broker_crash(
    native_build: Path, cnn_artifacts: Path, tmp_path: Path,
) -> None:
    # Prepare: round 0 open on a persisting broker, the aggregator gone; the native device
    # trains and its update waits at the broker
    broker, observer = open_round_then_leave(cnn_artifacts, tmp_path)
    devices = [native_device(f"dev{i}", FED, cnn_artifacts, _partition(tmp_path, i, 2),
                             broker.port, tmp_path / "dev") for i in range(2)]
    sent = [decode_update(p) for p in _receive(observer, 2, 60)]
    observer.stop()

    # Execute: the broker dies without saving (queue and retained global lost) and comes back;
    # the aggregator restarts from its store and republishes round 0
    try:
        with broker_crashed_aggregator_back(broker, cnn_artifacts, tmp_path) as (
                coordinator, records, second):
            second.join(90)
            outputs = [d.communicate(timeout=30)[0] for d in devices]
    finally:
        for d in devices:
            d.kill()

    # Assert: round 0 closed with the same two updates (same ids: the same bytes were resent)
    assert [r.devices for r in records] == [("dev0", "dev1")], outputs
    assert all(coordinator.store.is_accepted(u.update_id) for u in sent)
    assert [d.returncode for d in devices] == [0, 0], outputs
    assert all("trained 1 rounds" in out for out in outputs), outputs


def test_native_device_keeps_its_update_across_a_restart(
    native_build: Path, mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path,
) -> None:
    # Prepare: a fake aggregator opens round 0; the device trains, sends, and is SIGKILLed
    federation = "restart"
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "fake-aggregator")
    agg.start()
    agg.subscribe(topics.update_filter(federation))
    train = TrainConfig(local_steps=2)
    round0 = encode_global(GlobalModel(federation, 0, manifest.sha256, initial, train))
    agg.publish(topics.global_topic(federation), round0, retain=True)
    partition, state = _partition(tmp_path, 0, 2), tmp_path / "state"
    device = native_device("native-0", federation, cnn_artifacts, partition, mosquitto.port,
                           state)
    first = _next(agg, "/update/", 60).payload
    device.kill()
    device.wait()
    assert (state / "native-0.pending").exists()

    # Execute: it comes back; round 0's global arrives again (republished), then round 1's
    device = native_device("native-0", federation, cnn_artifacts, partition, mosquitto.port,
                           state)
    again = _next(agg, "/update/", 60).payload
    agg.publish(topics.global_topic(federation),
                encode_global(GlobalModel(federation, 1, manifest.sha256, initial, train)),
                retain=True)
    second = decode_update(_next(agg, "/update/", 60).payload)
    agg.publish(topics.global_topic(federation),
                encode_global(GlobalModel(federation, 2, manifest.sha256, initial, train,
                                          final=True)), retain=True)
    output = device.communicate(timeout=30)[0]
    agg.stop()

    # Assert: the same bytes were resent without training round 0 again; round 1 was trained
    assert again == first
    assert decode_update(first).round == 0 and second.round == 1
    assert "trained 1 rounds" in output, output
    assert not (state / "native-0.pending").exists()
