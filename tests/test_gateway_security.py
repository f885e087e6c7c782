"""The gateway's TLS broker: certificates, ACL and Mosquitto config, against a real Mosquitto."""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import transport.mqtt as mqtt_module
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


@pytest.fixture()
def gateway_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 under root's folder, and Mosquitto started as root
    # drops to the `mosquitto` user, which must be able to reach its key and ACL.
    folder = Path(tempfile.mkdtemp(prefix="edgefl-gateway-"))
    folder.chmod(0o755)
    yield folder / "gw"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def gateway(gateway_dir: Path) -> Iterator[GatewayFiles]:
    """A provisioned gateway whose Mosquitto runs with the generated config on a free port."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    files = init_gateway(gateway_dir, DEVICES, port=free_port())
    log = open(gateway_dir / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([MOSQUITTO, "-c", str(files.mosquitto_conf)], stdout=log, stderr=log)
    try:
        wait_for_port(files.host, files.port, 10)
        yield files
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def fed() -> str:
    return f"fed-{uuid.uuid4().hex[:8]}"


def _client(files: GatewayFiles, identity: str, **kw: object) -> MqttTransport:
    transport = MqttTransport(files.host, files.port, f"{identity}-{uuid.uuid4().hex[:6]}",
                              tls=files.tls_for(identity), **kw)  # type: ignore[arg-type]
    transport.start()
    return transport


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

    conf = files.mosquitto_conf.read_text()
    for line in ("allow_anonymous false", "require_certificate true",
                 "use_identity_as_username true", f"acl_file {files.acl_file}",
                 "listener 8883 gw.example.lan"):
        assert line in conf.splitlines()
    acl = files.acl_file.read_text().splitlines()
    assert "pattern write fl/v1/+/update/%u" in acl and "pattern read fl/v1/+/global" in acl
    assert acl[acl.index(f"user {AGGREGATOR_ID}") + 1:] == [
        "topic read fl/v1/+/update/+", "topic read fl/v1/+/status/+", "topic write fl/v1/+/global"]
    assert load_gateway(gateway_dir) == files


@pytest.mark.parametrize("devices", [["a/b"], ["+"], ["%u"], ["../x"], [""], ["a\n"], ["x" * 65],
                                     [AGGREGATOR_ID], ["dup", "dup"]])
def test_init_rejects_unsafe_device_ids(gateway_dir: Path, devices: list[str]) -> None:
    with pytest.raises(ValueError):
        init_gateway(gateway_dir, devices)
    assert not (gateway_dir / "ca" / "ca.key").exists()


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
    late = _client(gateway, "dev-b")  # a device joining later gets the retained global
    late.subscribe(topics.global_topic(fed))
    message = late.receive(5)
    assert message is not None and message.payload == b"global-1"
    for transport in (aggregator, device_a, device_b, late):
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
