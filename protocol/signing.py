"""Ed25519-signed frames around update payloads, so the aggregator knows which device wrote them.

TLS client certificates prove who *connected*; a signature proves who *wrote* the bytes, and it
survives relays (a gateway forwarding to an upstream aggregator) that TLS does not. The codec is
untouched: a signed frame wraps the exact payload bytes the codec produced.

Frame layout (all integers big-endian)::

    b"EFS1" | u16 n | device id (n bytes, UTF-8) | payload | Ed25519 signature (64 bytes)

The signature covers everything before it, so the device id is bound to the payload: a frame that
device A signed cannot be replayed on device B's topic, and editing the id breaks the signature.
Replays of A's own frame are left to the payload's round and update id, which the aggregator
already checks.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.codec import DecodeError

MAGIC = b"EFS1"  # "edgefl signed", frame version 1; a new layout gets a new magic
SIGNATURE_BYTES = 64  # Ed25519 signatures are always 64 bytes (RFC 8032)
PUBLIC_KEY_BYTES = 32
MAX_DEVICE_ID_BYTES = 255  # far above any real id; bounds what an unauthenticated frame can claim
REGISTRY_SCHEMA = 1
_ID_LENGTH = struct.Struct(">H")
_MIN_FRAME_BYTES = len(MAGIC) + _ID_LENGTH.size + 1 + SIGNATURE_BYTES

SigningRegistry = Mapping[str, Ed25519PublicKey]


class SignatureError(DecodeError):
    """A frame that is not validly signed by the device it claims to come from.

    `reason` is a short stable label for counters: `unsigned`, `malformed-frame`,
    `unknown-device`, `device-mismatch` or `bad-signature`.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# -- keys and the registry -------------------------------------------------------------------
def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key for one device."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private_file(Path(path), pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a key written by save_private_key.

    Raises:
        ValueError: the file holds no Ed25519 private key.
    """
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def registry_to_json(public_keys: Mapping[str, bytes]) -> str:
    """Serialise device id -> raw public key as the registry file the aggregator loads."""
    devices = {}
    for device_id, raw in sorted(public_keys.items()):
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(f"public key of {device_id!r} has {len(raw)} bytes, not 32")
        devices[device_id] = raw.hex()
    return json.dumps({"schema": REGISTRY_SCHEMA, "algorithm": "ed25519", "devices": devices},
                      indent=1)


def registry_from_json(text: str) -> dict[str, Ed25519PublicKey]:
    """Parse a registry written by registry_to_json.

    Raises:
        ValueError: wrong schema or algorithm, or a key that is not 32 bytes of hex.
    """
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("schema") != REGISTRY_SCHEMA:
        raise ValueError(f"signing registry schema must be {REGISTRY_SCHEMA}")
    if raw.get("algorithm") != "ed25519" or not isinstance(raw.get("devices"), dict):
        raise ValueError("signing registry must hold ed25519 keys under 'devices'")
    registry = {}
    for device_id, hex_key in raw["devices"].items():
        try:
            key_bytes = bytes.fromhex(hex_key)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"public key of {device_id!r} is not hex") from exc
        if len(key_bytes) != PUBLIC_KEY_BYTES:
            raise ValueError(f"public key of {device_id!r} has {len(key_bytes)} bytes, not 32")
        registry[str(device_id)] = Ed25519PublicKey.from_public_bytes(key_bytes)
    return registry


def load_registry(path: Path) -> dict[str, Ed25519PublicKey]:
    """Read the aggregator's registry of device public keys."""
    return registry_from_json(Path(path).read_text())


class RegistryFile(Mapping[str, Ed25519PublicKey]):
    """The registry file, read again whenever it changes on disk, so devices enrolled or
    revoked (`edgefl gateway enroll|revoke`) count without restarting the aggregator.

    A file that cannot be parsed after a change keeps the last good registry (and logs why).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._refresh()
        if self._stamp is None:
            raise ValueError(f"cannot read the signing registry {self.path}")

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                self._keys, self._stamp = load_registry(self.path), stamp
        except (OSError, ValueError) as exc:
            logging.getLogger(__name__).error("signing registry %s unreadable, keeping the "
                                              "previous one: %s", self.path, exc)

    def __getitem__(self, device_id: str) -> Ed25519PublicKey:
        self._refresh()  # one stat() per update: cheap next to decoding it
        return self._keys[device_id]

    def __iter__(self) -> Iterator[str]:
        self._refresh()
        return iter(self._keys)

    def __len__(self) -> int:
        self._refresh()
        return len(self._keys)


def write_private_file(path: Path, data: bytes) -> None:
    """Write secret bytes to a file that only its owner can read or write (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: a chmod after writing would leave a window where the
    # secret is readable under the process umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(data)


# -- frames ----------------------------------------------------------------------------------
def _header(device_id: str) -> bytes:
    encoded = device_id.encode()
    if not 0 < len(encoded) <= MAX_DEVICE_ID_BYTES:
        raise ValueError(f"device id must be 1..{MAX_DEVICE_ID_BYTES} UTF-8 bytes: {device_id!r}")
    return MAGIC + _ID_LENGTH.pack(len(encoded)) + encoded


def sign_payload(key: Ed25519PrivateKey, device_id: str, payload: bytes) -> bytes:
    """Wrap `payload` in a frame signed by `device_id`'s key."""
    signed_part = _header(device_id) + bytes(payload)
    return signed_part + key.sign(signed_part)


def is_signed(frame: bytes) -> bool:
    """Whether the bytes start like a signed frame (codec payloads start with zstd's magic)."""
    return bytes(frame[: len(MAGIC)]) == MAGIC


def signer_of(frame: bytes) -> str:
    """The device id a frame claims, without verifying anything.

    Raises:
        SignatureError: not a signed frame, or a malformed one.
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise SignatureError("malformed-frame", f"frame must be bytes, got {type(frame).__name__}")
    frame = bytes(frame)
    if not is_signed(frame):
        raise SignatureError("unsigned", "payload carries no signature frame")
    if len(frame) < _MIN_FRAME_BYTES:
        raise SignatureError("malformed-frame", f"{len(frame)} bytes is too short for a frame")
    (length,) = _ID_LENGTH.unpack_from(frame, len(MAGIC))
    start = len(MAGIC) + _ID_LENGTH.size
    if not 0 < length <= MAX_DEVICE_ID_BYTES or start + length + SIGNATURE_BYTES > len(frame):
        raise SignatureError("malformed-frame", f"device id length {length} does not fit")
    try:
        return frame[start : start + length].decode()
    except UnicodeDecodeError as exc:
        raise SignatureError("malformed-frame", "device id is not UTF-8") from exc


def open_signed(registry: SigningRegistry, device_id: str, frame: bytes) -> bytes:
    """Verify that `device_id` signed `frame` and return the payload inside.

    Args:
        registry: device id -> public key, from the gateway's registry file.
        device_id: who the frame is said to come from (the device segment of its MQTT topic).
        frame: bytes produced by sign_payload.

    Returns:
        The exact payload bytes that were signed.

    Raises:
        SignatureError: unsigned or malformed frame, a device not in the registry, a frame
            signed for another device, or a signature that does not verify.
    """
    claimed = signer_of(frame)
    public_key = registry.get(device_id)
    if public_key is None:
        raise SignatureError("unknown-device", f"no public key registered for {device_id!r}")
    if claimed != device_id:
        raise SignatureError("device-mismatch", f"frame of {claimed!r} sent as {device_id!r}")
    frame = bytes(frame)
    signed_part, signature = frame[:-SIGNATURE_BYTES], frame[-SIGNATURE_BYTES:]
    try:
        public_key.verify(signature, signed_part)
    except InvalidSignature as exc:
        raise SignatureError("bad-signature",
                             f"signature of {device_id!r} does not verify") from exc
    return signed_part[len(_header(claimed)) :]
