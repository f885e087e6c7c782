"""`edgefl gateway init`: CA, certificates, Mosquitto TLS config and ACL, device signing keys.

Layout of the folder it writes (copy each identity's folder to that machine only)::

    ca/ca.crt, ca/ca.key                 the CA: keep ca.key offline once devices are issued
    broker/mosquitto.conf, broker/acl    TLS listener (client certificates required), ACL
    broker/broker.crt, broker/broker.key, broker/ca.crt
    aggregator/client.crt, client.key, ca.crt, signing_registry.json
    devices/<id>/client.crt, client.key, ca.crt, signing.key
    gateway.json                         host, port and identities, for load_gateway()

Identity is the certificate's common name: Mosquitto's `use_identity_as_username` turns it into
the MQTT username, and the ACL's `%u` patterns confine each device to its own topics.

Run as root, the broker's key and data folder are given to the `mosquitto` user, which Mosquitto
switches to before reading them; that user must also be able to enter every folder above them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import pwd
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import topics
from protocol.signing import (
    generate_signing_key,
    public_key_bytes,
    registry_to_json,
    save_private_key,
    write_private_file,
)
from transport.broker import MESSAGE_SIZE_LIMIT_BYTES
from transport.mqtt import TlsFiles

AGGREGATOR_ID = "aggregator"  # the aggregator's certificate CN, hence its MQTT username
DEFAULT_TLS_PORT = 8883  # IANA's port for MQTT over TLS
CA_VALIDITY_DAYS = 3650
# 825 days is the longest leaf lifetime Apple platforms accept for TLS server certificates.
LEAF_VALIDITY_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)  # devices with slightly wrong clocks still accept new certs
# Device ids become certificate CNs (at most 64 characters in X.509), MQTT usernames substituted
# into ACL patterns, topic segments and folder names: keep them to a safe alphabet.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no "\n" tail
GATEWAY_FILE = "gateway.json"
REGISTRY_FILE = "signing_registry.json"
# Mosquitto started as root switches to this user before it reads its key and ACL (Debian's
# package creates it); when we provision as root, the broker's private files go to this user.
BROKER_USER = "mosquitto"


@dataclass(frozen=True, slots=True)
class GatewayFiles:
    """Paths of everything `init_gateway` wrote."""

    out_dir: Path
    host: str
    port: int
    ca_cert: Path
    ca_key: Path
    broker_cert: Path
    broker_key: Path
    mosquitto_conf: Path
    acl_file: Path
    signing_registry: Path
    aggregator: TlsFiles
    devices: dict[str, TlsFiles]
    signing_keys: dict[str, Path]  # device id -> its Ed25519 private key

    def tls_for(self, identity: str) -> TlsFiles:
        """TLS files of the aggregator or of one device."""
        if identity == AGGREGATOR_ID:
            return self.aggregator
        try:
            return self.devices[identity]
        except KeyError:
            raise KeyError(f"no certificate for {identity!r} in {self.out_dir}") from None


def _layout(out_dir: Path, host: str, port: int, devices: Sequence[str]) -> GatewayFiles:
    out = Path(out_dir).resolve()

    def identity(folder: Path) -> TlsFiles:
        return TlsFiles(folder / "ca.crt", folder / "client.crt", folder / "client.key")

    return GatewayFiles(
        out_dir=out, host=host, port=port,
        ca_cert=out / "ca" / "ca.crt", ca_key=out / "ca" / "ca.key",
        broker_cert=out / "broker" / "broker.crt", broker_key=out / "broker" / "broker.key",
        mosquitto_conf=out / "broker" / "mosquitto.conf", acl_file=out / "broker" / "acl",
        signing_registry=out / AGGREGATOR_ID / REGISTRY_FILE,
        aggregator=identity(out / AGGREGATOR_ID),
        devices={d: identity(out / "devices" / d) for d in devices},
        signing_keys={d: out / "devices" / d / "signing.key" for d in devices},
    )


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is usable as a CN, MQTT username, topic segment and folder name.

    Raises:
        ValueError: the id is empty, too long, uses other characters, or is the aggregator's.
    """
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 . _ - "
                         "and start with a letter or digit")
    if device_id == AGGREGATOR_ID:
        raise ValueError(f"{AGGREGATOR_ID!r} is the aggregator's identity, not a device id")
    return device_id


# -- certificates ----------------------------------------------------------------------------
def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 ECDSA: what every TLS stack (OpenSSL on the broker, mbedTLS on microcontrollers)
    # supports, with keys and handshakes far smaller than RSA.
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, days: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _leaf(subject: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None = None,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(cert_sign=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if san is not None:
        extensions.append((san, False))
    return _issue(subject, key, ca, ca_key, LEAF_VALIDITY_DAYS, extensions), key


def _server_names(host: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:  # a host name, not an address
        names.append(x509.DNSName(host))
    unique = list(dict.fromkeys(names))  # host may repeat 127.0.0.1 or localhost
    return x509.SubjectAlternativeName(unique)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_file(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


# -- broker configuration ----------------------------------------------------------------------
def acl_text() -> str:
    """Mosquitto ACL: devices write only their own topics and read the global; see module doc."""
    root = topics.ROOT  # ACL patterns need wildcards and %u, which topics' builders refuse
    return (
        "# Written by `edgefl gateway init`. Usernames are certificate CNs.\n"
        "# Every identity may publish only its own update and status, and read the global.\n"
        "# (Mosquitto warns that the global pattern has no %u: it is meant for everyone.)\n"
        f"pattern write {root}/+/update/%u\n"
        f"pattern write {root}/+/status/%u\n"
        f"pattern read {root}/+/global\n"
        "\n"
        "# Only the aggregator reads updates and statuses, and only it publishes the global.\n"
        f"user {AGGREGATOR_ID}\n"
        f"topic read {root}/+/update/+\n"
        f"topic read {root}/+/status/+\n"
        f"topic write {root}/+/global\n"
    )


def mosquitto_conf_text(files: GatewayFiles, bind_address: str, user: str | None) -> str:
    """Mosquitto 2 configuration: one TLS listener, client certificates required, ACL on."""
    data_dir = files.mosquitto_conf.parent / "data"
    return (
        "# Written by `edgefl gateway init`. Run: mosquitto -c <this file>\n"
        + (f"user {user}\n" if user else "")
        + "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"acl_file {files.acl_file}\n"
        # Persistence keeps the retained global and the aggregator's queued updates across a
        # broker restart.
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        f"message_size_limit {MESSAGE_SIZE_LIMIT_BYTES}\n"
        "max_queued_messages 10000\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        "\n"
        f"listener {files.port} {bind_address}\n"
        f"cafile {files.broker_cert.parent / 'ca.crt'}\n"
        f"certfile {files.broker_cert}\n"
        f"keyfile {files.broker_key}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "tls_version tlsv1.2\n"  # the minimum: TLS 1.0/1.1 are deprecated (RFC 8996)
    )


# -- the whole gateway -------------------------------------------------------------------------
def init_gateway(
    out_dir: Path, devices: Sequence[str], host: str = "127.0.0.1",
    port: int = DEFAULT_TLS_PORT, bind_address: str | None = None,
) -> GatewayFiles:
    """Create the CA, certificates, broker config, ACL and signing keys of a gateway.

    Args:
        out_dir: folder to write; must not already hold a gateway (re-issuing the CA would
            invalidate every deployed device certificate).
        devices: device ids; each gets a client certificate (CN = id) and an Ed25519 key.
        host: the name or address devices use to reach the broker; it goes in the broker
            certificate's SAN, beside localhost and 127.0.0.1.
        port: the broker's TLS port.
        bind_address: where the listener binds (default: `host`).

    Returns:
        The paths written.

    Raises:
        ValueError: a bad, duplicate or reserved device id.
        FileExistsError: `out_dir` already holds a gateway.
    """
    ids = [check_device_id(d) for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate device ids in {ids}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    files = _layout(out_dir, host, port, ids)
    if (files.out_dir / GATEWAY_FILE).exists() or files.ca_key.exists():
        raise FileExistsError(f"{files.out_dir} already holds a gateway; use a new folder")

    # 1. the CA, self-signed; it may sign leaves only (path length 0)
    ca_key = _new_key()
    ca = _issue("edgefl gateway CA", ca_key, None, ca_key, CA_VALIDITY_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(cert_sign=True), True),
    ])
    _write_key(files.ca_key, ca_key)
    _write_public(files.ca_cert, _pem(ca))

    # 2. the broker's server certificate
    cert, key = _leaf("edgefl broker", ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                      _server_names(host))
    _write_key(files.broker_key, key)
    _write_public(files.broker_cert, _pem(cert))
    _write_public(files.broker_cert.parent / "ca.crt", _pem(ca))

    # 3. client certificates: the aggregator and every device, CN = identity
    for identity, tls in [(AGGREGATOR_ID, files.aggregator), *files.devices.items()]:
        cert, key = _leaf(identity, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
        assert tls.cert is not None and tls.key is not None
        _write_key(tls.key, key)
        _write_public(tls.cert, _pem(cert))
        _write_public(tls.ca, _pem(ca))

    # 4. update-signing keys: the private half stays on the device, the aggregator gets the rest
    public_keys = {}
    for device_id, path in files.signing_keys.items():
        signing_key = generate_signing_key()
        save_private_key(signing_key, path)
        public_keys[device_id] = public_key_bytes(signing_key)
    _write_public(files.signing_registry, registry_to_json(public_keys).encode())

    # 5. broker configuration and the gateway description
    _write_public(files.acl_file, acl_text().encode())
    (files.mosquitto_conf.parent / "data").mkdir(exist_ok=True)
    broker_user = _broker_user()
    _write_public(files.mosquitto_conf,
                  mosquitto_conf_text(files, bind_address or host, broker_user).encode())
    if broker_user is not None:
        entry = pwd.getpwnam(broker_user)
        for path in (files.broker_key, files.mosquitto_conf.parent / "data"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    _write_public(files.out_dir / GATEWAY_FILE, json.dumps(
        {"host": host, "port": port, "aggregator": AGGREGATOR_ID, "devices": ids},
        indent=1).encode())
    return files


def _broker_user() -> str | None:
    """The user Mosquitto will run as when it differs from us: BROKER_USER if we are root."""
    if os.geteuid() != 0:
        return None  # mosquitto keeps the user that starts it, who owns what we write
    try:
        pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None  # no such user: mosquitto stays root too
    return BROKER_USER


def load_gateway(out_dir: Path) -> GatewayFiles:
    """The paths of a gateway folder written by init_gateway (read from its gateway.json)."""
    raw = json.loads((Path(out_dir) / GATEWAY_FILE).read_text())
    return _layout(out_dir, str(raw["host"]), int(raw["port"]), [str(d) for d in raw["devices"]])


# -- command line --------------------------------------------------------------------------
def cmd_gateway_init(args: argparse.Namespace) -> int:
    """Write a gateway folder and print how to start the broker."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        files = init_gateway(Path(args.out), devices, args.host, args.port)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"edgefl gateway init: {exc}") from exc
    print(f"gateway for {len(devices)} devices written to {files.out_dir}")
    print(f"start the broker:   mosquitto -c {files.mosquitto_conf}")
    print(f"aggregator files:   {files.out_dir / AGGREGATOR_ID}/")
    print(f"device files:       {files.out_dir / 'devices'}/<id>/ (copy each to its device)")
    print(f"keep offline:       {files.ca_key}")
    return 0


def add_gateway_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `gateway init` on the `edgefl` command's subparsers."""
    gateway = subparsers.add_parser("gateway", help="provision a TLS gateway broker")
    commands = gateway.add_subparsers(dest="gateway_command", required=True)
    init = commands.add_parser(
        "init", help="write CA, certificates, Mosquitto config + ACL and device signing keys")
    init.add_argument("--out", required=True, help="folder to create")
    init.add_argument("--devices", required=True, help="comma-separated device ids")
    init.add_argument("--host", default="127.0.0.1",
                      help="name or address devices connect to (goes in the broker certificate)")
    init.add_argument("--port", type=int, default=DEFAULT_TLS_PORT)
    init.set_defaults(func=cmd_gateway_init)
