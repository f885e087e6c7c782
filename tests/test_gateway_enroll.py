"""A gateway over time: enrolling devices, renewing and revoking certificates, their expiry;
checked against a real Mosquitto running the generated configuration."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
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
    certificate_expiry,
    enroll_devices,
    init_gateway,
    load_gateway,
    renew_certificate,
    revoke_device,
)
from protocol import topics
from protocol.signing import load_private_key, load_registry, public_key_bytes
from tests.test_gateway_security import (  # noqa: F401 - gateway_dir is a fixture
    DEVICES,
    _client,
    _drain,
    fed,
    gateway_dir,
    start_broker,
    stop_broker,
)
from transport.broker import free_port
from transport.mqtt import MqttTransport, TlsFiles, TransportError

RELOAD_S = 1.0  # Mosquitto handles SIGHUP in its next loop pass, well within this


class RunningGateway:
    """A gateway folder and the Mosquitto serving it, which tests may reload or restart."""

    def __init__(self, files: GatewayFiles) -> None:
        self.files = files
        self.proc = start_broker(files)

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its certificate, key and CRL."""
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(RELOAD_S)

    def restart(self) -> None:
        """Stop and start again with the same configuration."""
        stop_broker(self.proc)
        self.proc = start_broker(self.files)


@pytest.fixture()
def running(gateway_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:  # noqa: F811
    # A refused TLS 1.3 client notices only after its handshake, so bound the wait for CONNACK.
    monkeypatch.setattr(mqtt_module, "CONNECT_TIMEOUT_S", 3.0)
    gateway = RunningGateway(init_gateway(gateway_dir, DEVICES, port=free_port()))
    try:
        yield gateway
    finally:
        stop_broker(gateway.proc)


def _cert(path: Path | None) -> x509.Certificate:
    assert path is not None
    return x509.load_pem_x509_certificate(path.read_bytes())


def _connects(files: GatewayFiles, tls: TlsFiles) -> bool:
    transport = MqttTransport(files.host, files.port, "probe", tls=tls)
    try:
        transport.start()
    except TransportError:
        return False
    finally:
        transport.stop()
    return True


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edgefl")
    add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gateway", *argv])
    return int(args.func(args))


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a gateway command that must fail; return its message, checked to be one line."""
    with pytest.raises(SystemExit) as exc:
        _cli(*argv)
    message = str(exc.value.code)
    assert message.startswith(f"edgefl gateway {argv[0]}: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def _snapshot(folder: Path, exclude: set[str]) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not exclude & set(p.relative_to(folder).parts)}


# -- enroll ------------------------------------------------------------------------------------
def test_enroll_adds_a_device_the_running_broker_accepts_and_leaves_the_others_alone(
        running: RunningGateway, fed: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # Prepare
    files = running.files
    changed = {"gateway.json", "signing_registry.json", "issued.json", "dev-c", "data",
               "mosquitto.log"}
    before = _snapshot(files.out_dir, changed)

    # Execute: on the running broker, without a restart
    assert _cli("enroll", "--gateway", str(files.out_dir), "dev-c", "--days", "90") == 0
    after = load_gateway(files.out_dir)

    # Assert: dev-c's files, registry entry and listing; nothing else rewritten
    assert "enrolled dev-c" in capsys.readouterr().out
    assert _snapshot(files.out_dir, changed) == before
    assert list(after.devices) == [*DEVICES, "dev-c"]
    cert = _cert(after.devices["dev-c"].cert)
    cert.verify_directly_issued_by(_cert(files.ca_cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-c"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=90)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=90, hours=1)
    registry = load_registry(after.signing_registry)
    assert set(registry) == {*DEVICES, "dev-c"}
    assert public_key_bytes(registry["dev-c"]) == public_key_bytes(
        load_private_key(after.signing_keys["dev-c"]))
    # the broker takes dev-c at once, under the same ACL as everyone
    aggregator = _client(after, AGGREGATOR_ID)
    aggregator.subscribe(topics.update_filter(fed))
    device = _client(after, "dev-c")
    device.publish(topics.update_topic(fed, "dev-a"), b"forged")
    device.publish(topics.update_topic(fed, "dev-c"), b"update-c")
    assert [m.payload for m in _drain(aggregator)] == [b"update-c"]
    for transport in (aggregator, device):
        transport.stop()


def test_enroll_and_renew_refuse_bad_requests_with_one_line(
        gateway_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # Prepare
    files = init_gateway(gateway_dir, DEVICES)
    folder = str(files.out_dir)

    # Execute / Assert
    assert "dev-a" in _one_line_error(capsys, "enroll", "--gateway", folder, "dev-a")
    assert "reserved" in _one_line_error(capsys, "enroll", "--gateway", folder, AGGREGATOR_ID)
    assert "duplicate" in _one_line_error(capsys, "enroll", "--gateway", folder, "x", "x")
    assert "must be" in _one_line_error(capsys, "enroll", "--gateway", folder, "a/b")
    assert "at least 1 day" in _one_line_error(capsys, "enroll", "--gateway", folder, "new",
                                               "--days", "0")
    assert "holds no gateway" in _one_line_error(capsys, "enroll", "--gateway",
                                                 str(gateway_dir.parent / "none"), "new")
    assert "no certificate for 'nobody'" in _one_line_error(capsys, "renew", "--gateway",
                                                             folder, "nobody")
    files.ca_key.rename(files.ca_key.with_suffix(".offline"))
    assert "offline storage" in _one_line_error(capsys, "enroll", "--gateway", folder, "new")
    assert "offline storage" in _one_line_error(capsys, "renew", "--gateway", folder, "dev-a")
    # nothing was half-done
    assert list(load_gateway(folder).devices) == DEVICES
    assert set(load_registry(files.signing_registry)) == set(DEVICES)
    assert not (files.out_dir / "devices" / "new").exists()


# -- renew -------------------------------------------------------------------------------------
def test_renewed_device_certificate_keeps_its_identity_and_connects(
        running: RunningGateway) -> None:
    # Prepare
    files = running.files
    tls = files.devices["dev-a"]
    old_cert, old_key = _cert(tls.cert), tls.key.read_bytes()  # type: ignore[union-attr]

    # Execute
    assert _cli("renew", "--gateway", str(files.out_dir), "dev-a", "--days", "10") == 0

    # Assert: same name and usage, new serial, key and dates; the broker takes it
    new = _cert(tls.cert)
    assert new.subject == old_cert.subject and new.serial_number != old_cert.serial_number
    assert tls.key.read_bytes() != old_key  # type: ignore[union-attr]
    assert new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert new.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1)
    new.verify_directly_issued_by(_cert(files.ca_cert))
    assert _connects(files, tls)


def test_renewed_broker_certificate_keeps_its_names_and_sighup_puts_it_in_use(
        running: RunningGateway) -> None:
    # Prepare
    files = running.files
    old = _cert(files.broker_cert)

    # Execute
    renew_certificate(files.out_dir, "broker", days=20)
    running.reload()

    # Assert: the broker now presents the new certificate, with the old SAN
    new = _cert(files.broker_cert)
    assert new.serial_number != old.serial_number
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName) == \
        old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    tls = files.devices["dev-b"]
    context.load_cert_chain(str(tls.cert), str(tls.key))
    with socket.create_connection((files.host, files.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=files.host) as conn:
        presented = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))
    assert presented.serial_number == new.serial_number
    assert _connects(files, tls)


# -- revoke ------------------------------------------------------------------------------------
def test_revoked_device_is_refused_by_the_broker_and_dropped_from_the_registry(
        running: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: dev-a has a renewed certificate, and still holds its old one; it is connected
    files = running.files
    tls = files.devices["dev-a"]
    assert tls.cert is not None and tls.key is not None
    old = TlsFiles(tls.ca, files.out_dir / "old.crt", files.out_dir / "old.key")
    old.cert.write_bytes(tls.cert.read_bytes())  # type: ignore[union-attr]
    old.key.write_bytes(tls.key.read_bytes())  # type: ignore[union-attr]
    renew_certificate(files.out_dir, "dev-a")
    held = MqttTransport(files.host, files.port, "held", tls=tls)
    held.start()

    # Execute
    assert _cli("revoke", "--gateway", str(files.out_dir), "dev-a") == 0
    revoked = load_gateway(files.out_dir)

    # Assert: the files
    assert "revoked dev-a" in capsys.readouterr().out
    assert list(revoked.devices) == ["dev-b"]
    assert set(load_registry(revoked.signing_registry)) == {"dev-b"}
    assert json.loads((files.out_dir / "gateway.json").read_text())["revoked"] == ["dev-a"]
    crl = x509.load_pem_x509_crl(files.crl_file.read_bytes())
    assert crl.is_signature_valid(_cert(files.ca_cert).public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {_cert(tls.cert).serial_number,
                                              _cert(old.cert).serial_number}
    # SIGHUP reloads the CRL: both of dev-a's certificates are refused, dev-b is not; the
    # connection dev-a already had survives a reload...
    running.reload()
    assert not _connects(files, tls) and not _connects(files, old)
    assert _connects(files, files.devices["dev-b"])
    assert held.connected
    # ...but not a restart, after which it cannot come back
    running.restart()
    time.sleep(2.5)  # paho's first reconnect attempt comes after 1 s
    assert not held.connected and not _connects(files, tls)
    assert _connects(files, files.devices["dev-b"])
    held.stop()


def test_revoke_refuses_unknown_and_revoked_devices_and_enroll_keeps_the_id_taken(
        gateway_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # Prepare
    files = init_gateway(gateway_dir, DEVICES)
    folder = str(files.out_dir)
    revoke_device(files.out_dir, "dev-a")

    # Execute / Assert
    assert "already revoked" in _one_line_error(capsys, "revoke", "--gateway", folder, "dev-a")
    assert "not an enrolled device" in _one_line_error(capsys, "revoke", "--gateway", folder,
                                                       "ghost")
    assert "already enrolled or revoked" in _one_line_error(capsys, "enroll", "--gateway",
                                                            folder, "dev-a")
    assert "no certificate for 'dev-a'" in _one_line_error(capsys, "renew", "--gateway", folder,
                                                           "dev-a")


def test_revoke_adds_the_crl_to_a_config_written_without_one(gateway_dir: Path) -> None:  # noqa: F811
    # Prepare: a mosquitto.conf from before gateways had a CRL
    files = init_gateway(gateway_dir, DEVICES)
    conf = files.mosquitto_conf.read_text().replace(f"crlfile {files.crl_file}\n", "")
    files.mosquitto_conf.write_text(conf)
    files.crl_file.unlink()

    # Execute
    revoke_device(files.out_dir, "dev-b")

    # Assert: the listener (last in the file) now names the CRL, which lists dev-b
    assert files.mosquitto_conf.read_text().splitlines()[-1] == f"crlfile {files.crl_file}"
    crl = x509.load_pem_x509_crl(files.crl_file.read_bytes())
    assert [r.serial_number for r in crl] == [_cert(files.devices["dev-b"].cert).serial_number]


# -- expiry --------------------------------------------------------------------------------------
def test_certificate_expiry_lists_every_identity_present(gateway_dir: Path) -> None:  # noqa: F811
    # Prepare
    files = init_gateway(gateway_dir, DEVICES, days=60)
    enroll_devices(files.out_dir, ["dev-c"], days=5)
    revoke_device(files.out_dir, "dev-b")
    files = load_gateway(files.out_dir)

    # Execute
    expiry = certificate_expiry(files)

    # Assert: ISO dates, the revoked device gone
    paths = {"ca": files.ca_cert, "broker": files.broker_cert,
             AGGREGATOR_ID: files.aggregator.cert, "dev-a": files.devices["dev-a"].cert,
             "dev-c": files.devices["dev-c"].cert}
    assert expiry == {i: _cert(p).not_valid_after_utc.isoformat() for i, p in paths.items()}
    now = dt.datetime.now(dt.UTC)
    assert dt.datetime.fromisoformat(expiry["dev-c"]) - now < dt.timedelta(days=5, hours=1)
    assert dt.datetime.fromisoformat(expiry["ca"]) - now > dt.timedelta(days=3000)


def test_certificate_expiry_on_an_aggregator_host_lists_what_it_holds(
        gateway_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # Prepare: what the aggregator's container mounts, gateway.json and aggregator/ only
    files = init_gateway(gateway_dir, DEVICES)
    copy = tmp_path / "gw"
    (copy / AGGREGATOR_ID).mkdir(parents=True)
    (copy / "gateway.json").write_bytes((files.out_dir / "gateway.json").read_bytes())
    for name in ("ca.crt", "client.crt"):
        (copy / AGGREGATOR_ID / name).write_bytes((files.out_dir / AGGREGATOR_ID / name)
                                                  .read_bytes())

    # Execute
    expiry = certificate_expiry(load_gateway(copy))

    # Assert: the CA's expiry comes from the aggregator's copy of it
    assert expiry == {"ca": _cert(files.ca_cert).not_valid_after_utc.isoformat(),
                      AGGREGATOR_ID: _cert(files.aggregator.cert).not_valid_after_utc.isoformat()}


def test_subprocess_cli_reports_errors_in_one_line(gateway_dir: Path) -> None:  # noqa: F811
    # The real `edgefl` entry point: a missing gateway is one line on stderr, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "gateway", "revoke", "--gateway",
         str(gateway_dir), "dev-a"], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"edgefl gateway revoke: {gateway_dir.resolve()} holds no gateway (gateway.json is "
        "missing); run `edgefl gateway init` first"]
