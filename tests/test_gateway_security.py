"""The gateway's TLS broker: certificates, ACL and Mosquitto config, against a real Mosquitto."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import transport.mqtt as mqtt_module
from edgefl.certificates import CLOCK_SKEW
from edgefl.gateway import (
    AGGREGATOR_ID,
    GatewayFiles,
    add_gateway_parser,
    init_gateway,
    load_gateway,
)
from protocol import topics
from protocol.signing import load_private_key, load_registry, public_key_bytes
from transport.broker import free_port, wait_for_port
from transport.mqtt import Message, MqttTransport, TlsFiles, TransportError

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEVICES = ["dev-a", "dev-b"]
QUIET_S = 1.0  # how long "nothing arrives" is watched; the broker delivers in milliseconds
# Mosquitto's default autosave is every 30 min; the gateway's config saves after each change.
PERSIST_WAIT_S = 1.0


@pytest.fixture()
def gateway_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 under root's folder, and Mosquitto started as root
    # drops to the `mosquitto` user, which must be able to reach its key and ACL.
    folder = Path(tempfile.mkdtemp(prefix="edgefl-gateway-"))
    folder.chmod(0o755)
    yield folder / "gw"
    shutil.rmtree(folder, ignore_errors=True)


def start_broker(files: GatewayFiles) -> subprocess.Popen[bytes]:
    """Mosquitto with the gateway's generated config, logging beside the folder; listening."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    with open(files.out_dir / "mosquitto.log", "ab") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(files.mosquitto_conf)],
                                stdout=log, stderr=log)
    wait_for_port(files.host, files.port, 10)
    return proc


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    """Stop Mosquitto cleanly (it saves its database), killing it if it hangs."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture()
def gateway(gateway_dir: Path) -> Iterator[GatewayFiles]:
    """A provisioned gateway whose Mosquitto runs with the generated config on a free port."""
    files = init_gateway(gateway_dir, DEVICES, port=free_port())
    proc = start_broker(files)
    try:
        yield files
    finally:
        stop_broker(proc)


@pytest.fixture()
def fed() -> str:
    return f"fed-{uuid.uuid4().hex[:8]}"


def _client(files: GatewayFiles, identity: str, **kw: object) -> MqttTransport:
    transport = MqttTransport(files.host, files.port, f"{identity}-{uuid.uuid4().hex[:6]}",
                              tls=files.tls_for(identity), **kw)  # type: ignore[arg-type]
    transport.start()
    return transport


def _persistent(files: GatewayFiles, identity: str, client_id: str) -> MqttTransport:
    """A connected client with a persistent session, as the aggregator's."""
    transport = MqttTransport(files.host, files.port, client_id, persistent_session=True,
                              tls=files.tls_for(identity))
    transport.start()
    return transport


def _subscribed(subscriber: MqttTransport, topic_filter: str, publisher: MqttTransport,
                topic: str) -> None:
    """Subscribe, and return once a probe on `topic` arrives: the broker holds the filter."""
    subscriber.subscribe(topic_filter)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish(topic, b"probe")
        if (message := subscriber.receive(0.5)) is not None and message.payload == b"probe":
            _drain(subscriber, 0.2)  # later probes
            return
    raise AssertionError(f"subscription to {topic_filter} never took effect")


def _drain(transport: MqttTransport, wait_s: float = QUIET_S) -> list[Message]:
    messages = []
    while (message := transport.receive(wait_s)) is not None:
        messages.append(message)
    return messages


# -- files -----------------------------------------------------------------------------------
def test_init_writes_private_keys_0600_and_a_valid_chain(gateway_dir: Path) -> None:
    files = init_gateway(gateway_dir, DEVICES, host="gw.example.lan", port=8883)
    keys = [files.ca_key, files.broker_key, files.aggregator.key,
            *(t.key for t in files.devices.values()), *files.signing_keys.values()]
    for key in keys:
        assert key is not None and stat.S_IMODE(key.stat().st_mode) == 0o600, key

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(files.broker_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gw.example.lan"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for identity in (AGGREGATOR_ID, *DEVICES):
        tls = files.tls_for(identity)
        assert tls.cert is not None
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert tls.ca.read_bytes() == files.ca_cert.read_bytes()

    registry = load_registry(files.signing_registry)
    assert set(registry) == set(DEVICES)
    for device_id, path in files.signing_keys.items():
        assert public_key_bytes(registry[device_id]) == public_key_bytes(load_private_key(path))

    conf = files.mosquitto_conf.read_text().splitlines()
    for line in ("allow_anonymous false", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 f"acl_file {files.acl_file}", f"crlfile {files.crl_file}",
                 "autosave_on_changes true", "autosave_interval 1",
                 "listener 8883 gw.example.lan"):
        assert line in conf, line
    # the client-id and CRL options are listener options: they must follow `listener`
    listener = conf.index("listener 8883 gw.example.lan")
    assert conf.index("use_username_as_clientid true") > listener
    assert conf.index(f"crlfile {files.crl_file}") > listener
    assert list(x509.load_pem_x509_crl(files.crl_file.read_bytes())) == []
    acl = files.acl_file.read_text().splitlines()
    assert "pattern write fl/v1/+/update/%u" in acl and "pattern read fl/v1/+/global" in acl
    assert "pattern read fl/v1/+/residual" in acl  # exact aggregation's catch-up, read-only
    assert acl[acl.index(f"user {AGGREGATOR_ID}") + 1:] == [
        "topic read fl/v1/+/update/+", "topic read fl/v1/+/status/+", "topic write fl/v1/+/global",
        "topic write fl/v1/+/residual",
        "# Under an upstream aggregator (--upstream): its round goes up as a partial sum through",
        "# the bridge, and the bridge delivers the upstream global under upstream/.",
        "topic write fl/v1/+/partial/+", "topic read upstream/fl/v1/+/global",
        "# As the upstream aggregator (--merge-gateways): reads the gateways' partial sums.",
        "topic read fl/v1/+/partial/+"]
    assert "pattern write fl/v1/+/partial/%u" in acl
    assert load_gateway(gateway_dir) == files


@pytest.mark.parametrize("devices", [["a/b"], ["+"], ["%u"], ["../x"], [""], ["a\n"], ["x" * 65],
                                     [AGGREGATOR_ID], ["broker"], ["ca"], ["dup", "dup"]])
def test_init_rejects_unsafe_device_ids(gateway_dir: Path, devices: list[str]) -> None:
    with pytest.raises(ValueError):
        init_gateway(gateway_dir, devices)
    assert not (gateway_dir / "ca" / "ca.key").exists()


def test_certificates_are_valid_from_a_day_before_issue(gateway_dir: Path) -> None:
    # A device whose clock lags by minutes or hours (no RTC, no NTP yet) must still accept the
    # broker's certificate, and the broker a device's.
    files = init_gateway(gateway_dir, DEVICES, days=30)
    now = dt.datetime.now(dt.UTC)
    assert CLOCK_SKEW >= dt.timedelta(days=1)
    paths = [files.ca_cert, files.broker_cert, *(files.tls_for(i).cert
                                                  for i in (AGGREGATOR_ID, *DEVICES))]
    for path in paths:
        assert path is not None
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        assert cert.not_valid_before_utc <= now - dt.timedelta(days=1), path
        if path != files.ca_cert:  # --days sets the leaves' lifetime
            lifetime = cert.not_valid_after_utc - now
            assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30), path


def test_init_refuses_to_overwrite_a_gateway(gateway_dir: Path) -> None:
    init_gateway(gateway_dir, ["d1"])
    with pytest.raises(FileExistsError):
        init_gateway(gateway_dir, ["d2"])


def test_cli_subcommand_writes_a_gateway(gateway_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edgefl")
    add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gateway", "init", "--out", str(gateway_dir),
                              "--devices", "a, b,c", "--port", "18883"])
    assert args.func(args) == 0
    files = load_gateway(gateway_dir)
    assert sorted(files.devices) == ["a", "b", "c"] and files.port == 18883
    assert "mosquitto -c" in capsys.readouterr().out


# -- the broker enforces it ------------------------------------------------------------------
def test_updates_and_status_reach_the_aggregator_and_its_global_reaches_devices(
        gateway: GatewayFiles, fed: str) -> None:
    # Prepare
    aggregator = _client(gateway, AGGREGATOR_ID)
    aggregator.subscribe(topics.update_filter(fed))
    aggregator.subscribe(topics.status_filter(fed))
    will = (topics.status_topic(fed, "dev-a"), b"offline")
    device_a = _client(gateway, "dev-a", will=will)
    device_b = _client(gateway, "dev-b")
    for device in (device_a, device_b):
        device.subscribe(topics.global_topic(fed))

    # Execute
    device_a.publish(topics.status_topic(fed, "dev-a"), b"online", retain=True)
    device_a.publish(topics.update_topic(fed, "dev-a"), b"update-a")
    aggregator.publish(topics.global_topic(fed), b"global-1", retain=True)

    # Assert
    received = {(m.topic, m.payload) for m in _drain(aggregator)}
    assert received == {(topics.status_topic(fed, "dev-a"), b"online"),
                        (topics.update_topic(fed, "dev-a"), b"update-a")}
    for device in (device_a, device_b):
        message = device.receive(5)
        assert message is not None and message.payload == b"global-1"
    # dev-b coming back later gets the retained global. (A second connection with the same
    # certificate would replace the first: the client id is the certificate's CN.)
    device_b.stop()
    late = _client(gateway, "dev-b")
    late.subscribe(topics.global_topic(fed))
    message = late.receive(5)
    assert message is not None and message.payload == b"global-1"
    for transport in (aggregator, device_a, late):
        transport.stop()


def test_device_cannot_publish_as_another_device_or_as_the_aggregator(
        gateway: GatewayFiles, fed: str) -> None:
    aggregator = _client(gateway, AGGREGATOR_ID)
    aggregator.subscribe(topics.update_filter(fed))
    aggregator.subscribe(topics.status_filter(fed))
    device_b = _client(gateway, "dev-b")
    device_b.subscribe(topics.global_topic(fed))
    device_a = _client(gateway, "dev-a")

    device_a.publish(topics.update_topic(fed, "dev-b"), b"forged-update")
    device_a.publish(topics.status_topic(fed, "dev-b"), b"forged-status")
    device_a.publish(topics.global_topic(fed), b"forged-global", retain=True)
    # The broker handles one client's publishes in order: once this one arrives, the forged
    # ones before it would have too.
    device_a.publish(topics.update_topic(fed, "dev-a"), b"marker")

    assert [m.payload for m in _drain(aggregator)] == [b"marker"]
    assert _drain(device_b) == []
    for transport in (aggregator, device_a, device_b):
        transport.stop()


def test_device_cannot_read_other_devices_updates_or_statuses(
        gateway: GatewayFiles, fed: str) -> None:
    spy = _client(gateway, "dev-a")
    for topic_filter in (topics.update_filter(fed), topics.status_filter(fed),
                         topics.update_topic(fed, "dev-b"), "#"):
        spy.subscribe(topic_filter)
    aggregator = _client(gateway, AGGREGATOR_ID)
    aggregator.subscribe(topics.update_filter(fed))
    device_b = _client(gateway, "dev-b")

    device_b.publish(topics.status_topic(fed, "dev-b"), b"online", retain=True)
    device_b.publish(topics.update_topic(fed, "dev-b"), b"secret-update")

    message = aggregator.receive(5)
    assert message is not None and message.payload == b"secret-update"
    assert _drain(spy) == []
    for transport in (spy, aggregator, device_b):
        transport.stop()


def test_a_gateway_bridge_identity_sends_only_its_own_partial_sums(
        gateway: GatewayFiles, fed: str) -> None:
    # On an upstream broker provisioned by `gateway init`, a gateway's bridge connects with an
    # identity enrolled under its gateway id (dev-a here): it may write its own partial-sum
    # topic, and only the aggregator reads partial sums.
    aggregator = _client(gateway, AGGREGATOR_ID)
    bridge = _client(gateway, "dev-a")
    _subscribed(aggregator, topics.partial_filter(fed), bridge, topics.partial_topic(fed, "dev-a"))
    spy = _client(gateway, "dev-b")
    spy.subscribe(topics.partial_filter(fed))
    bridge.publish(topics.partial_topic(fed, "dev-b"), b"forged-partial")
    bridge.publish(topics.partial_topic(fed, "dev-a"), b"partial")
    assert [m.payload for m in _drain(aggregator)] == [b"partial"]
    assert _drain(spy) == []
    for transport in (aggregator, bridge, spy):
        transport.stop()


@pytest.mark.parametrize("client", ["no-certificate", "plain-tcp", "foreign-ca"])
def test_clients_without_a_gateway_certificate_cannot_connect(
        gateway: GatewayFiles, gateway_dir: Path, client: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A refused TLS 1.3 client notices only after its handshake, so bound the wait for CONNACK.
    monkeypatch.setattr(mqtt_module, "CONNECT_TIMEOUT_S", 2.0)
    if client == "no-certificate":
        tls: TlsFiles | None = TlsFiles(gateway.ca_cert)
    elif client == "plain-tcp":
        tls = None
    else:
        other = init_gateway(gateway_dir.parent / "other", ["dev-a"])
        tls = TlsFiles(gateway.ca_cert, other.devices["dev-a"].cert, other.devices["dev-a"].key)
    transport = MqttTransport(gateway.host, gateway.port, f"intruder-{client}", tls=tls)
    with pytest.raises(TransportError):
        transport.start()
    transport.stop()


def test_client_refuses_a_broker_certificate_from_another_ca(
        gateway: GatewayFiles, gateway_dir: Path) -> None:
    other = init_gateway(gateway_dir.parent / "other", ["dev-a"])
    device = gateway.devices["dev-a"]
    transport = MqttTransport(gateway.host, gateway.port, "misled",
                              tls=TlsFiles(other.ca_cert, device.cert, device.key))
    with pytest.raises(TransportError):
        transport.start()


# -- client ids are certificate identities -----------------------------------------------------
def _client_id(fed: str, identity: str) -> str:
    """The client id `edgefl aggregator` and `edgefl client` ask for."""
    return f"aggregator-{fed}" if identity == AGGREGATOR_ID else f"{fed}-{identity}"


@pytest.mark.parametrize("victim", [AGGREGATOR_ID, "dev-b"])
def test_a_device_cannot_kick_another_identity_off_with_its_client_id(
        gateway: GatewayFiles, fed: str, victim: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the victim connected with the client id our commands use
    monkeypatch.setattr(mqtt_module, "CONNECT_TIMEOUT_S", 5.0)
    client_id = _client_id(fed, victim)
    target = _persistent(gateway, victim, client_id)

    # Execute: dev-a, with its own valid certificate, connects under that client id again
    # and again (before the fix, each attempt closed the victim's connection)
    with caplog.at_level(logging.WARNING, logger="transport.mqtt"):
        for _ in range(3):
            intruder = MqttTransport(gateway.host, gateway.port, client_id,
                                     tls=gateway.tls_for("dev-a"))
            intruder.start()
            time.sleep(0.3)
            intruder.stop()
        time.sleep(QUIET_S)

    # Assert: the victim never lost its connection
    lost = [r.getMessage() for r in caplog.records if "lost the broker" in r.getMessage()]
    assert lost == [] and target.connected
    target.stop()


@pytest.mark.parametrize("victim", [AGGREGATOR_ID, "dev-b"])
def test_a_clean_start_under_another_identitys_client_id_keeps_its_session(
        gateway: GatewayFiles, fed: str, victim: str) -> None:
    # Prepare: the victim subscribes with a persistent session and goes away; three QoS 1
    # messages (not retained: only the session can bring them back) are queued for it
    if victim == AGGREGATOR_ID:  # dev-b's updates queue for the aggregator
        sender_id, topic_filter = "dev-b", topics.update_filter(fed)
        topic = topics.update_topic(fed, "dev-b")
    else:  # globals queue for dev-b
        sender_id, topic_filter = AGGREGATOR_ID, topics.global_topic(fed)
        topic = topics.global_topic(fed)
    sender = _client(gateway, sender_id)
    away = _persistent(gateway, victim, _client_id(fed, victim))
    _subscribed(away, topic_filter, sender, topic)
    away.stop()
    for i in range(3):
        sender.publish(topic, f"queued-{i}".encode())

    # Execute: dev-a connects under the victim's client id with a clean start, which would
    # discard the session of whoever holds that client id
    intruder = MqttTransport(gateway.host, gateway.port, _client_id(fed, victim),
                             tls=gateway.tls_for("dev-a"))
    intruder.start()
    intruder.stop()
    back = _persistent(gateway, victim, _client_id(fed, victim))

    # Assert: the victim's session, and the messages queued in it, are still there
    assert [m.payload for m in _drain(back)] == [b"queued-0", b"queued-1", b"queued-2"]
    for transport in (sender, back):
        transport.stop()


# -- persistence ---------------------------------------------------------------------------------
def test_messages_queued_for_the_aggregator_survive_a_broker_crash(
        gateway_dir: Path, fed: str) -> None:
    # Prepare: the aggregator's persistent session holds three updates sent while it was away
    files = init_gateway(gateway_dir, DEVICES, port=free_port())
    broker = start_broker(files)
    try:
        device = _client(files, "dev-a")
        away = _persistent(files, AGGREGATOR_ID, _client_id(fed, AGGREGATOR_ID))
        _subscribed(away, topics.update_filter(fed), device, topics.update_topic(fed, "dev-a"))
        away.stop()
        for i in range(3):
            device.publish(topics.update_topic(fed, "dev-a"), f"update-{i}".encode())
        device.stop()

        # Execute: shortly after, the broker dies without saving (power cut, OOM kill) and
        # comes back with the same configuration
        time.sleep(PERSIST_WAIT_S)
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        broker = start_broker(files)
        back = _persistent(files, AGGREGATOR_ID, _client_id(fed, AGGREGATOR_ID))

        # Assert
        assert [m.payload for m in _drain(back)] == [b"update-0", b"update-1", b"update-2"]
        back.stop()
    finally:
        stop_broker(broker)
