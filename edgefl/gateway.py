"""`edgefl gateway`: CA, certificates, Mosquitto TLS config and ACL, device signing keys.

`init` provisions a gateway folder; `enroll` adds devices to it, `workers` adds identities for
aggregator worker processes, `renew` re-issues one certificate and `revoke` bars a device (CRL +
signing registry). Layout of the folder (copy
each identity's folder to that machine only)::

    ca/ca.crt, ca/ca.key                 the CA: keep ca.key offline between enroll/renew/revoke
    ca/issued.json                       serial, identity and expiry of every certificate issued
    broker/mosquitto.conf, broker/acl    TLS listener (client certificates required), ACL
    broker/broker.crt, broker/broker.key, broker/ca.crt, broker/crl.pem
    aggregator/client.crt, client.key, ca.crt, signing_registry.json
    aggregator-w<k>/client.crt, client.key, ca.crt   worker k of `edgefl aggregator --workers`
    devices/<id>/client.crt, client.key, ca.crt, signing.key
    gateway.json                         host, port and identities, for load_gateway()

Identity is the certificate's common name: Mosquitto's `use_identity_as_username` turns it into
the MQTT username, `use_username_as_clientid` into the client id (so no client can take over
another's connection or session), and the ACL's `%u` patterns confine each device to its own
topics.

Run as root, the broker's key and data folder are given to the `mosquitto` user, which Mosquitto
switches to before reading them; that user must also be able to enter every folder above them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgefl.certificates import (
    LEAF_VALIDITY_DAYS,
    common_name,
    crl,
    leaf,
    load_certificate,
    load_key,
    new_ca,
    reissue,
    revoked_entries,
    server_names,
    to_pem,
    write_key,
    write_public,
)
from protocol import topics
from protocol.signing import (
    generate_signing_key,
    load_registry,
    public_key_bytes,
    registry_to_json,
    save_private_key,
)
from transport.broker import MESSAGE_SIZE_LIMIT_BYTES
from transport.mqtt import TlsFiles

AGGREGATOR_ID = "aggregator"  # the aggregator's certificate CN, hence its MQTT username
BROKER_ID = "broker"  # how `renew` and certificate_expiry name the broker's server certificate
CA_ID = "ca"  # how certificate_expiry names the CA certificate
_RESERVED_IDS = (AGGREGATOR_ID, BROKER_ID, CA_ID)
# Worker processes of `edgefl aggregator --workers N` connect as aggregator-w0, aggregator-w1…:
# the broker makes each certificate's CN its client id, so each worker needs a CN of its own.
_WORKER_ID = re.compile(rf"{AGGREGATOR_ID}-w[0-9]+")


def worker_id(index: int) -> str:
    """The identity (certificate CN, MQTT username and client id) of aggregator worker `index`."""
    return f"{AGGREGATOR_ID}-w{index}"

DEFAULT_TLS_PORT = 8883  # IANA's port for MQTT over TLS
MAX_WORKERS = 64
# Device ids become certificate CNs (at most 64 characters in X.509), MQTT usernames substituted
# into ACL patterns, topic segments and folder names: keep them to a safe alphabet.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no "\n" tail
GATEWAY_FILE = "gateway.json"
REGISTRY_FILE = "signing_registry.json"
ISSUED_FILE = "issued.json"
CRL_FILE = "crl.pem"
# Mosquitto started as root switches to this user before it reads its key and ACL (Debian's
# package creates it); when we provision as root, the broker's private files go to this user.
BROKER_USER = "mosquitto"


@dataclass(frozen=True, slots=True)
class GatewayFiles:
    """Paths of a gateway folder (as `init_gateway` writes it)."""

    out_dir: Path
    host: str
    port: int
    ca_cert: Path
    ca_key: Path
    issued_log: Path
    broker_cert: Path
    broker_key: Path
    crl_file: Path
    mosquitto_conf: Path
    acl_file: Path
    signing_registry: Path
    aggregator: TlsFiles
    devices: dict[str, TlsFiles]  # enrolled devices; revoked ones are not listed
    signing_keys: dict[str, Path]  # device id -> its Ed25519 private key
    workers: dict[str, TlsFiles] = field(default_factory=dict)  # aggregator-w<k> -> files

    def tls_for(self, identity: str) -> TlsFiles:
        """TLS files of the aggregator, one of its workers or one device."""
        if identity == AGGREGATOR_ID:
            return self.aggregator
        try:
            return self.workers[identity] if identity in self.workers else self.devices[identity]
        except KeyError:
            raise KeyError(f"no certificate for {identity!r} in {self.out_dir}") from None


def _layout(out_dir: Path, host: str, port: int, devices: Sequence[str],
            workers: int = 0) -> GatewayFiles:
    out = Path(out_dir).resolve()

    def identity(folder: Path) -> TlsFiles:
        return TlsFiles(folder / "ca.crt", folder / "client.crt", folder / "client.key")

    return GatewayFiles(
        out_dir=out, host=host, port=port,
        ca_cert=out / "ca" / "ca.crt", ca_key=out / "ca" / "ca.key",
        issued_log=out / "ca" / ISSUED_FILE,
        broker_cert=out / "broker" / "broker.crt", broker_key=out / "broker" / "broker.key",
        crl_file=out / "broker" / CRL_FILE,
        mosquitto_conf=out / "broker" / "mosquitto.conf", acl_file=out / "broker" / "acl",
        signing_registry=out / AGGREGATOR_ID / REGISTRY_FILE,
        aggregator=identity(out / AGGREGATOR_ID),
        devices={d: identity(out / "devices" / d) for d in devices},
        signing_keys={d: out / "devices" / d / "signing.key" for d in devices},
        workers={worker_id(k): identity(out / worker_id(k)) for k in range(workers)},
    )


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is usable as a CN, MQTT username, topic segment and folder name.

    Raises:
        ValueError: the id is empty, too long, uses other characters, or is reserved
            (aggregator, broker, ca).
    """
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must be 1-64 of A-Z a-z 0-9 . _ - "
                         "and start with a letter or digit")
    if device_id in _RESERVED_IDS or _WORKER_ID.fullmatch(device_id):
        raise ValueError(f"{device_id!r} is reserved ({', '.join(_RESERVED_IDS)}, "
                         f"{worker_id(0)}, {worker_id(1)}…), not a device id")
    return device_id


def _new_device_ids(devices: Sequence[str]) -> list[str]:
    """Checked device ids, refusing duplicates."""
    ids = [check_device_id(d) for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate device ids in {ids}")
    return ids


def _check_days(days: int) -> int:
    """Return `days` if it is a usable certificate validity."""
    if days < 1:
        raise ValueError(f"certificate validity must be at least 1 day, not {days}")
    return days


# -- broker configuration ----------------------------------------------------------------------
def acl_text(workers: Sequence[str] = ()) -> str:
    """Mosquitto ACL: devices write only their own topics and read the global; see module doc.
    Each of the aggregator's `workers` may read updates (through the shared subscription)."""
    root = topics.ROOT  # ACL patterns need wildcards and %u, which topics' builders refuse
    return (
        "# Written by `edgefl gateway init`. Usernames are certificate CNs.\n"
        "# Every identity may publish only its own update and status, and read the global (and\n"
        "# the residual catch-up of exact aggregation).\n"
        "# (Mosquitto warns that the global pattern has no %u: it is meant for everyone.)\n"
        f"pattern write {root}/+/update/%u\n"
        f"pattern write {root}/+/status/%u\n"
        f"pattern read {root}/+/global\n"
        f"pattern read {root}/+/residual\n"
        "# A gateway's bridge, enrolled here under its gateway id, sends its partial sums.\n"
        f"pattern write {root}/+/partial/%u\n"
        "\n"
        "# Only the aggregator reads updates and statuses, and only it publishes the global.\n"
        f"user {AGGREGATOR_ID}\n"
        f"topic read {root}/+/update/+\n"
        f"topic read {root}/+/status/+\n"
        f"topic write {root}/+/global\n"
        f"topic write {root}/+/residual\n"
        "# Under an upstream aggregator (--upstream): its round goes up as a partial sum through\n"
        "# the bridge, and the bridge delivers the upstream global under upstream/.\n"
        f"topic write {root}/+/partial/+\n"
        f"topic read upstream/{root}/+/global\n"
        "# As the upstream aggregator (--merge-gateways): reads the gateways' partial sums.\n"
        f"topic read {root}/+/partial/+\n"
        + "".join(f"\n# Aggregator worker process (edgefl aggregator --workers): reads updates.\n"
                  f"user {w}\ntopic read {root}/+/update/+\n" for w in workers)
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
        # broker restart. Mosquitto writes its database only at a clean stop and on autosave
        # (default: every 30 min). With autosave_on_changes the interval counts changes, and 1
        # saves after every loop pass that stored a message or changed a subscription or a
        # retained message: a crash loses well under a second. docs/DEPLOY.md: the disk cost.
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        "autosave_on_changes true\n"
        "autosave_interval 1\n"
        f"message_size_limit {MESSAGE_SIZE_LIMIT_BYTES}\n"
        "max_queued_messages 10000\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        "\n"
        f"listener {files.port} {bind_address}\n"
        f"cafile {files.broker_cert.parent / 'ca.crt'}\n"
        f"certfile {files.broker_cert}\n"
        f"keyfile {files.broker_key}\n"
        # Revoked client certificates; SIGHUP reloads it (and certfile/keyfile).
        f"crlfile {files.crl_file}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        # The client id becomes the certificate CN too: a device that asks for the aggregator's
        # or another device's client id gets its own, so it can neither kick that client off
        # nor discard its persistent session with a clean start.
        "use_username_as_clientid true\n"
        "tls_version tlsv1.2\n"  # the minimum: TLS 1.0/1.1 are deprecated (RFC 8996)
    )


def _ensure_crl_in_conf(files: GatewayFiles) -> None:
    """Add `crlfile` to a mosquitto.conf written before gateways had a CRL."""
    text = files.mosquitto_conf.read_text()
    if not any(line.split()[:1] == ["crlfile"] for line in text.splitlines()):
        # The listener's options end the file, so an appended line belongs to the listener.
        write_public(files.mosquitto_conf,
                     (text.rstrip("\n") + f"\ncrlfile {files.crl_file}\n").encode())


# -- issuing -----------------------------------------------------------------------------------
def _load_ca(files: GatewayFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key; the key must be back from offline storage."""
    if not files.ca_key.exists():
        raise FileNotFoundError(f"the CA key {files.ca_key} is missing: put it back from "
                                "offline storage to issue or revoke certificates")
    return load_certificate(files.ca_cert), load_key(files.ca_key)


def _record_issued(files: GatewayFiles, certs: Iterable[x509.Certificate]) -> None:
    """Append certificates to ca/issued.json, so `revoke` can list every one of an identity."""
    log = json.loads(files.issued_log.read_text()) if files.issued_log.exists() else []
    log += [{"serial": format(c.serial_number, "x"), "identity": common_name(c),
             "not_after": c.not_valid_after_utc.isoformat()} for c in certs]
    write_public(files.issued_log, json.dumps(log, indent=1).encode())


def _issue_client(files: GatewayFiles, identity: str, ca: x509.Certificate,
                  ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    """Write a client certificate (CN = identity), its key and the CA into its folder."""
    tls = files.tls_for(identity)
    assert tls.cert is not None and tls.key is not None
    cert, key = leaf(identity, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, days=days)
    write_key(tls.key, key)
    write_public(tls.cert, to_pem(cert))
    write_public(tls.ca, to_pem(ca))
    return cert


def _new_signing_keys(files: GatewayFiles, ids: Iterable[str]) -> dict[str, bytes]:
    """Write an Ed25519 key into each device's folder; return the public halves."""
    public_keys = {}
    for device_id in ids:
        signing_key = generate_signing_key()
        save_private_key(signing_key, files.signing_keys[device_id])
        public_keys[device_id] = public_key_bytes(signing_key)
    return public_keys


def _registry_keys(files: GatewayFiles) -> dict[str, bytes]:
    """Device id -> raw public key, as the aggregator's registry holds them now."""
    return {d: public_key_bytes(k) for d, k in load_registry(files.signing_registry).items()}


def _write_registry(files: GatewayFiles, public_keys: Mapping[str, bytes]) -> None:
    """Replace the aggregator's signing registry."""
    write_public(files.signing_registry, registry_to_json(public_keys).encode())


def _write_description(files: GatewayFiles, revoked: Sequence[str]) -> None:
    """Write gateway.json: what load_gateway reads back."""
    write_public(files.out_dir / GATEWAY_FILE, json.dumps(
        {"host": files.host, "port": files.port, "aggregator": AGGREGATOR_ID,
         "devices": list(files.devices), "revoked": list(revoked),
         "workers": len(files.workers)}, indent=1).encode())


def _give_to_broker(paths: Iterable[Path]) -> None:
    """Chown the broker's private files to the user it will run as, when that is not us."""
    broker_user = _broker_user()
    if broker_user is None:
        return
    entry = pwd.getpwnam(broker_user)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


# -- the whole gateway -------------------------------------------------------------------------
def init_gateway(
    out_dir: Path, devices: Sequence[str], host: str = "127.0.0.1",
    port: int = DEFAULT_TLS_PORT, bind_address: str | None = None,
    days: int = LEAF_VALIDITY_DAYS, workers: int = 0,
) -> GatewayFiles:
    """Create the CA, certificates, broker config, ACL, CRL and signing keys of a gateway.

    Args:
        out_dir: folder to write; must not already hold a gateway (re-issuing the CA would
            invalidate every deployed device certificate).
        devices: device ids; each gets a client certificate (CN = id) and an Ed25519 key.
        host: the name or address devices use to reach the broker; it goes in the broker
            certificate's SAN, beside localhost and 127.0.0.1.
        port: the broker's TLS port.
        bind_address: where the listener binds (default: `host`).
        days: validity of the broker, aggregator and device certificates.
        workers: identities for this many aggregator worker processes (`--workers`).

    Returns:
        The paths written.

    Raises:
        ValueError: a bad, duplicate or reserved device id, a bad port or validity.
        FileExistsError: `out_dir` already holds a gateway.
    """
    ids = _new_device_ids(devices)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    _check_days(days)
    _check_workers(workers)
    files = _layout(out_dir, host, port, ids, workers)
    if (files.out_dir / GATEWAY_FILE).exists() or files.ca_key.exists():
        raise FileExistsError(f"{files.out_dir} already holds a gateway; use a new folder")

    # 1. the CA, self-signed; it may sign leaves only (path length 0)
    ca, ca_key = new_ca("edgefl gateway CA")
    write_key(files.ca_key, ca_key)
    write_public(files.ca_cert, to_pem(ca))

    # 2. the broker's server certificate, and an empty CRL (mosquitto.conf names it)
    broker, key = leaf("edgefl broker", ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                       server_names(host), days)
    write_key(files.broker_key, key)
    write_public(files.broker_cert, to_pem(broker))
    write_public(files.broker_cert.parent / "ca.crt", to_pem(ca))
    write_public(files.crl_file, to_pem(crl(ca, ca_key, [])))

    # 3. client certificates: the aggregator and every device, CN = identity
    clients = [_issue_client(files, i, ca, ca_key, days)
               for i in (AGGREGATOR_ID, *files.workers, *ids)]
    _record_issued(files, [broker, *clients])

    # 4. update-signing keys: the private half stays on the device, the aggregator gets the rest
    _write_registry(files, _new_signing_keys(files, ids))

    # 5. broker configuration and the gateway description
    write_public(files.acl_file, acl_text(list(files.workers)).encode())
    (files.mosquitto_conf.parent / "data").mkdir(exist_ok=True)
    write_public(files.mosquitto_conf,
                 mosquitto_conf_text(files, bind_address or host, _broker_user()).encode())
    _give_to_broker([files.broker_key, files.mosquitto_conf.parent / "data"])
    _write_description(files, revoked=[])
    return files


def enroll_devices(out_dir: Path, devices: Sequence[str],
                   days: int = LEAF_VALIDITY_DAYS) -> GatewayFiles:
    """Add devices to an existing gateway: certificate, key, signing key, registry entry.

    The other identities' files stay as they are; the ACL needs no change (its patterns match
    any certificate CN). The aggregator reads the registry when it starts.

    Raises:
        ValueError: a bad, duplicate or reserved device id, or a bad validity.
        FileExistsError: a device id is already enrolled or was revoked.
        FileNotFoundError: no gateway in `out_dir`, or its CA key is offline.
    """
    ids = _new_device_ids(devices)
    _check_days(days)
    old = load_gateway(out_dir)
    revoked = _revoked_ids(old)
    taken = [d for d in ids
             if d in old.devices or d in revoked or (old.out_dir / "devices" / d).exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} already enrolled or revoked in "
                              f"{old.out_dir}; choose a new id")
    ca, ca_key = _load_ca(old)
    files = _layout(old.out_dir, old.host, old.port, [*old.devices, *ids], len(old.workers))
    _record_issued(files, [_issue_client(files, d, ca, ca_key, days) for d in ids])
    _write_registry(files, _registry_keys(old) | _new_signing_keys(files, ids))
    _write_description(files, revoked)
    return files


def _check_workers(workers: int) -> int:
    """Return `workers` if it is a usable number of aggregator worker identities."""
    if not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"aggregator workers must be 0 to {MAX_WORKERS}, not {workers}")
    return workers


def add_workers(out_dir: Path, workers: int, days: int = LEAF_VALIDITY_DAYS) -> GatewayFiles:
    """Issue identities for aggregator workers up to `workers` (the existing ones stay) and
    rewrite the ACL to let them read updates; the broker uses it once reloaded (SIGHUP).

    Raises:
        ValueError: a bad count or validity.
        FileNotFoundError: no gateway in `out_dir`, or its CA key is offline.
    """
    _check_workers(workers)
    _check_days(days)
    old = load_gateway(out_dir)
    ca, ca_key = _load_ca(old)
    files = _layout(old.out_dir, old.host, old.port, list(old.devices),
                    max(workers, len(old.workers)))
    _record_issued(files, [_issue_client(files, w, ca, ca_key, days)
                           for w in files.workers if w not in old.workers])
    write_public(files.acl_file, acl_text(list(files.workers)).encode())
    _write_description(files, _revoked_ids(old))
    return files


def renew_certificate(out_dir: Path, identity: str, days: int = LEAF_VALIDITY_DAYS) -> Path:
    """Re-issue one leaf certificate with a new key: same CN, usage and SAN; new dates.

    `identity` is `broker`, `aggregator` or an enrolled device id. The old certificate stays
    valid until it expires (revoke the device to end it sooner). Returns the certificate's path.

    Raises:
        ValueError: an unknown identity or a bad validity.
        FileNotFoundError: no gateway in `out_dir`, or its CA key is offline.
    """
    _check_days(days)
    files = load_gateway(out_dir)
    cert_path, key_path = _leaf_paths(files, identity)
    ca, ca_key = _load_ca(files)
    cert, key = reissue(load_certificate(cert_path), ca, ca_key, days)
    write_key(key_path, key)
    write_public(cert_path, to_pem(cert))
    if identity == BROKER_ID:
        _give_to_broker([key_path])
    _record_issued(files, [cert])
    return cert_path


def _leaf_paths(files: GatewayFiles, identity: str) -> tuple[Path, Path]:
    """Certificate and key paths of the broker, the aggregator or an enrolled device."""
    if identity == BROKER_ID:
        return files.broker_cert, files.broker_key
    try:
        tls = files.tls_for(identity)
    except KeyError:
        raise ValueError(f"no certificate for {identity!r}: name {BROKER_ID}, "
                         f"{AGGREGATOR_ID} or an enrolled device") from None
    assert tls.cert is not None and tls.key is not None
    return tls.cert, tls.key


def revoke_device(out_dir: Path, device_id: str) -> GatewayFiles:
    """Revoke every certificate issued to a device and drop its key from the signing registry.

    The CRL (broker/crl.pem) takes effect when Mosquitto reloads (SIGHUP: new connections are
    refused) or restarts (which also ends the device's current connection). The id stays taken.

    Raises:
        ValueError: `device_id` is not an enrolled device.
        FileNotFoundError: no gateway in `out_dir`, or its CA key is offline.
    """
    old = load_gateway(out_dir)
    revoked = _revoked_ids(old)
    if device_id not in old.devices:
        state = "already revoked" if device_id in revoked else "not an enrolled device"
        raise ValueError(f"{device_id!r} is {state} in {old.out_dir}")
    ca, ca_key = _load_ca(old)
    entries = revoked_entries(old.crl_file)
    listed = {serial for serial, _ in entries}
    now = dt.datetime.now(dt.UTC)
    entries += [(s, now) for s in sorted(_serials_of(old, device_id) - listed)]
    write_public(old.crl_file, to_pem(crl(ca, ca_key, entries)))
    _ensure_crl_in_conf(old)
    files = _layout(old.out_dir, old.host, old.port, [d for d in old.devices if d != device_id],
                    len(old.workers))
    _write_registry(files, {d: k for d, k in _registry_keys(old).items() if d != device_id})
    _write_description(files, [*revoked, device_id])
    return files


def _serials_of(files: GatewayFiles, identity: str) -> set[int]:
    """Serials of every certificate issued to `identity`: the log's and the current one's."""
    log = json.loads(files.issued_log.read_text()) if files.issued_log.exists() else []
    serials = {int(e["serial"], 16) for e in log if e["identity"] == identity}
    tls = files.tls_for(identity)
    if tls.cert is not None and tls.cert.exists():  # gateways older than the log
        serials.add(load_certificate(tls.cert).serial_number)
    return serials


def certificate_expiry(files: GatewayFiles) -> dict[str, str]:
    """Identity (ca, broker, aggregator, device ids) -> ISO 8601 expiry of its certificate.

    Certificates absent from this copy of the folder (an aggregator host holds only its own
    and the CA's) are left out.
    """
    paths = {CA_ID: files.ca_cert if files.ca_cert.exists() else files.aggregator.ca,
             BROKER_ID: files.broker_cert}
    paths |= {i: files.tls_for(i).cert for i in (AGGREGATOR_ID, *files.workers, *files.devices)}
    return {identity: load_certificate(path).not_valid_after_utc.isoformat()
            for identity, path in paths.items() if path is not None and path.exists()}


def _broker_user() -> str | None:
    """The user Mosquitto will run as when it differs from us: BROKER_USER if we are root."""
    if os.geteuid() != 0:
        return None  # mosquitto keeps the user that starts it, who owns what we write
    try:
        pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None  # no such user: mosquitto stays root too
    return BROKER_USER


def _description(out_dir: Path) -> dict:
    """gateway.json's content."""
    path = Path(out_dir) / GATEWAY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{Path(out_dir).resolve()} holds no gateway ({GATEWAY_FILE} "
                                "is missing); run `edgefl gateway init` first")
    return dict(json.loads(path.read_text()))


def _revoked_ids(files: GatewayFiles) -> list[str]:
    """Ids of the devices revoked from this gateway."""
    return [str(d) for d in _description(files.out_dir).get("revoked", [])]


def load_gateway(out_dir: Path) -> GatewayFiles:
    """The paths of a gateway folder written by init_gateway (read from its gateway.json)."""
    raw = _description(out_dir)
    return _layout(out_dir, str(raw["host"]), int(raw["port"]), [str(d) for d in raw["devices"]],
                   int(raw.get("workers", 0)))


# -- command line --------------------------------------------------------------------------
@contextmanager
def _one_line_errors(command: str) -> Iterator[None]:
    """Bad input or missing files end `edgefl gateway <command>` with one line."""
    try:
        yield
    except (ValueError, OSError) as exc:
        raise SystemExit(f"edgefl gateway {command}: {exc}") from exc


def cmd_gateway_init(args: argparse.Namespace) -> int:
    """Write a gateway folder and print how to start the broker."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    with _one_line_errors("init"):
        files = init_gateway(Path(args.out), devices, args.host, args.port, days=args.days,
                             workers=args.workers)
    print(f"gateway for {len(devices)} devices written to {files.out_dir}")
    print(f"start the broker:   mosquitto -c {files.mosquitto_conf}")
    print(f"aggregator files:   {files.out_dir / AGGREGATOR_ID}/")
    print(f"device files:       {files.out_dir / 'devices'}/<id>/ (copy each to its device)")
    print(f"keep offline:       {files.ca_key}")
    return 0


def cmd_gateway_enroll(args: argparse.Namespace) -> int:
    """Add devices to a gateway folder and say what to copy where."""
    with _one_line_errors("enroll"):
        files = enroll_devices(Path(args.gateway), args.device_ids, args.days)
    for device_id in args.device_ids:
        print(f"enrolled {device_id}: copy {files.out_dir / 'devices' / device_id}/ and "
              f"{files.out_dir / GATEWAY_FILE} to it")
    print(f"the aggregator picks up {files.signing_registry} when it changes (copy it there if "
          "it runs elsewhere)")
    return 0


def cmd_gateway_workers(args: argparse.Namespace) -> int:
    """Issue aggregator worker identities and say how to put them in use."""
    with _one_line_errors("workers"):
        files = add_workers(Path(args.gateway), args.count, args.days)
    print(f"{len(files.workers)} aggregator worker identities in {files.out_dir}/"
          f"{worker_id(0)}…; the ACL lets them read updates")
    print("reload the broker to use the new ACL: kill -HUP <mosquitto pid>")
    return 0


def cmd_gateway_renew(args: argparse.Namespace) -> int:
    """Re-issue one certificate and say how to put it in use."""
    with _one_line_errors("renew"):
        path = renew_certificate(Path(args.gateway), args.identity, args.days)
    expires = load_certificate(path).not_valid_after_utc.date().isoformat()
    print(f"renewed {args.identity} until {expires}: {path} and its key")
    if args.identity == BROKER_ID:
        print("reload the broker to use it: kill -HUP <mosquitto pid>")
    else:
        print(f"copy {path.parent}/ to {args.identity} and restart it there")
    return 0


def cmd_gateway_revoke(args: argparse.Namespace) -> int:
    """Revoke a device and say how to make the broker and the aggregator honour it."""
    with _one_line_errors("revoke"):
        files = revoke_device(Path(args.gateway), args.device_id)
    print(f"revoked {args.device_id}: listed in {files.crl_file}, "
          f"removed from {files.signing_registry}")
    print("reload the broker (kill -HUP <mosquitto pid>) to refuse its new connections, or "
          "restart it to also end its current one; the aggregator drops its key when its "
          "signing registry changes")
    return 0


def add_gateway_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `gateway init|enroll|renew|revoke` on the `edgefl` command's subparsers."""
    gateway = subparsers.add_parser("gateway", help="provision a TLS gateway broker")
    commands = gateway.add_subparsers(dest="gateway_command", required=True)
    days = {"type": int, "default": LEAF_VALIDITY_DAYS,
            "help": f"certificate validity in days (default {LEAF_VALIDITY_DAYS})"}
    init = commands.add_parser(
        "init", help="write CA, certificates, Mosquitto config + ACL and device signing keys")
    init.add_argument("--out", required=True, help="folder to create")
    init.add_argument("--devices", required=True, help="comma-separated device ids")
    init.add_argument("--host", default="127.0.0.1",
                      help="name or address devices connect to (goes in the broker certificate)")
    init.add_argument("--port", type=int, default=DEFAULT_TLS_PORT)
    init.add_argument("--days", **days)
    init.add_argument("--workers", type=int, default=0,
                      help="identities for this many aggregator worker processes "
                           "(edgefl aggregator --workers)")
    init.set_defaults(func=cmd_gateway_init)

    workers = commands.add_parser(
        "workers", help="issue identities for N aggregator worker processes (ACL included)")
    workers.add_argument("--gateway", required=True, help="folder from `edgefl gateway init`")
    workers.add_argument("count", type=int, metavar="N")
    workers.add_argument("--days", **days)
    workers.set_defaults(func=cmd_gateway_workers)

    enroll = commands.add_parser("enroll", help="add devices to an existing gateway folder")
    enroll.add_argument("--gateway", required=True, help="folder from `edgefl gateway init`")
    enroll.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    enroll.add_argument("--days", **days)
    enroll.set_defaults(func=cmd_gateway_enroll)

    renew = commands.add_parser("renew", help="re-issue one certificate (new key, same identity)")
    renew.add_argument("--gateway", required=True, help="folder from `edgefl gateway init`")
    renew.add_argument("identity", help=f"{BROKER_ID}, {AGGREGATOR_ID} or a device id")
    renew.add_argument("--days", **days)
    renew.set_defaults(func=cmd_gateway_renew)

    revoke = commands.add_parser(
        "revoke", help="revoke a device's certificates (CRL) and drop its signing key")
    revoke.add_argument("--gateway", required=True, help="folder from `edgefl gateway init`")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.set_defaults(func=cmd_gateway_revoke)
