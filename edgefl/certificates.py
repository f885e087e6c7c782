"""X.509 building blocks of the gateway's CA: keys, certificates, re-issue and the CRL.

`edgefl.gateway` decides what to issue to whom; this module only knows how.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.signing import write_private_file

CA_VALIDITY_DAYS = 3650
# 825 days is the longest leaf lifetime Apple platforms accept for TLS server certificates.
LEAF_VALIDITY_DAYS = 825
# Certificates (and the CRL) are valid from this long before they are made: a device whose
# clock lags by minutes or hours (no RTC battery, no NTP yet) still accepts the broker's
# certificate, and a broker whose clock lags the CA machine's still accepts devices and the CRL.
CLOCK_SKEW = dt.timedelta(days=1)
# Extensions that follow the key or the issuer: a re-issued certificate gets fresh ones.
_KEY_BOUND = (x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: what every TLS stack (OpenSSL, mbedTLS) supports, small and fast."""
    return ec.generate_private_key(ec.SECP256R1())


def name(common_name: str) -> x509.Name:
    """The subject of one of our certificates: O=edgefl, CN=`common_name`."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, days: int,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer_key` (self-signed when `issuer` is None)."""
    if days < 1:
        raise ValueError(f"validity must be at least 1 day, not {days}")
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
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


def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Key usage of a CA (signs certificates and CRLs) or of a leaf (signs handshakes)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def new_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign leaves only (path length 0)."""
    key = new_key()
    return issue(name(common_name), key, None, key, CA_VALIDITY_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (key_usage(cert_sign=True), True),
    ]), key


def leaf(subject: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
         usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None = None,
         days: int = LEAF_VALIDITY_DAYS,
         ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and its end-entity certificate for TLS client or server use."""
    key = new_key()
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage(cert_sign=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if san is not None:
        extensions.append((san, False))
    return issue(name(subject), key, ca, ca_key, days, extensions), key


def reissue(old: x509.Certificate, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
            days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and certificate with `old`'s subject and extensions (usage, SAN), new dates."""
    kept = [(e.value, e.critical) for e in old.extensions if e.oid not in _KEY_BOUND]
    key = new_key()
    return issue(old.subject, key, ca, ca_key, days, kept), key


def server_names(host: str) -> x509.SubjectAlternativeName:
    """SAN of the broker: localhost, 127.0.0.1 and `host` (a name or an address)."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:  # a host name, not an address
        names.append(x509.DNSName(host))
    unique = list(dict.fromkeys(names))  # host may repeat 127.0.0.1 or localhost
    return x509.SubjectAlternativeName(unique)


def common_name(cert: x509.Certificate) -> str:
    """The certificate's CN."""
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# -- revocation ------------------------------------------------------------------------------
def crl(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
        revoked: Sequence[tuple[int, dt.datetime]]) -> x509.CertificateRevocationList:
    """A CRL of `revoked` (serial, revocation time), signed by the CA, valid as long as it.

    OpenSSL refuses every client once the broker's CRL is past its next update, so this one
    lasts as long as the CA itself; write a new one whenever a certificate is revoked.
    """
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(max(ca.not_valid_after_utc, now + dt.timedelta(days=1)))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        # RFC 5280 wants an increasing CRL number; the time does, one CRL a second at most
        .add_extension(x509.CRLNumber(int(now.timestamp())), False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, hashes.SHA256())


def revoked_entries(path: Path) -> list[tuple[int, dt.datetime]]:
    """(serial, revocation time) of every certificate in the CRL at `path` (none if absent)."""
    if not path.exists():
        return []
    loaded = x509.load_pem_x509_crl(path.read_bytes())
    return [(r.serial_number, r.revocation_date_utc) for r in loaded]


# -- files -----------------------------------------------------------------------------------
def to_pem(item: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """PEM encoding of a certificate or a CRL."""
    return item.public_bytes(serialization.Encoding.PEM)


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key (as write_key writes it)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key as PKCS#8 PEM, mode 0600."""
    write_private_file(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (mode 0644) atomically: readers see the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o644)
    os.replace(partial, path)
