"""Ed25519-signed update frames: only the registered device's key, on its own topic, opens one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol import codec
from protocol.codec import DecodeError
from protocol.messages import Update
from protocol.signing import (
    MAGIC,
    SIGNATURE_BYTES,
    SignatureError,
    generate_signing_key,
    is_signed,
    load_private_key,
    load_registry,
    open_signed,
    public_key_bytes,
    registry_from_json,
    registry_to_json,
    save_private_key,
    sign_payload,
    signer_of,
)

KEY_A, KEY_B, KEY_C = generate_signing_key(), generate_signing_key(), generate_signing_key()
REGISTRY = registry_from_json(registry_to_json(
    {"dev-a": public_key_bytes(KEY_A), "dev-b": public_key_bytes(KEY_B)}))


def _payload(device_id: str = "dev-a") -> bytes:
    return codec.encode_update(Update(
        "fed", 2, device_id, "ab" * 32, 64, f"{device_id}-2-x",
        {"head.bias": np.arange(3, dtype=np.float32)}))


def _reason(frame: bytes, device_id: str = "dev-a") -> str:
    with pytest.raises(SignatureError) as info:
        open_signed(REGISTRY, device_id, frame)
    return info.value.reason


def test_signed_frame_opens_to_the_exact_payload() -> None:
    payload = _payload()
    frame = sign_payload(KEY_A, "dev-a", payload)
    assert is_signed(frame) and not is_signed(payload)
    assert signer_of(frame) == "dev-a"
    assert open_signed(REGISTRY, "dev-a", frame) == payload
    assert codec.decode_update(open_signed(REGISTRY, "dev-a", bytearray(frame))).round == 2
    assert len(frame) == len(payload) + len(MAGIC) + 2 + len("dev-a") + SIGNATURE_BYTES


def test_unsigned_payload_is_rejected() -> None:
    assert _reason(_payload()) == "unsigned"


def test_wrong_signature_is_rejected() -> None:
    frame = bytearray(sign_payload(KEY_A, "dev-a", _payload()))
    frame[-1] ^= 0x01
    assert _reason(bytes(frame)) == "bad-signature"


def test_frame_signed_with_another_devices_key_is_rejected() -> None:
    assert _reason(sign_payload(KEY_B, "dev-a", _payload())) == "bad-signature"
    assert _reason(sign_payload(KEY_C, "dev-a", _payload())) == "bad-signature"


@pytest.mark.parametrize("offset", [0, 100, -SIGNATURE_BYTES - 1])
def test_tampered_payload_is_rejected(offset: int) -> None:
    payload = _payload()
    frame = bytearray(sign_payload(KEY_A, "dev-a", payload))
    header = len(frame) - len(payload) - SIGNATURE_BYTES
    frame[header + offset if offset >= 0 else offset] ^= 0x40
    assert _reason(bytes(frame)) == "bad-signature"


def test_frame_replayed_for_another_device_is_rejected() -> None:
    frame = sign_payload(KEY_A, "dev-a", _payload())
    assert _reason(frame, device_id="dev-b") == "device-mismatch"
    # Rewriting the embedded id to match the topic breaks the signature instead.
    forged = frame.replace(b"dev-a", b"dev-b", 1)
    assert signer_of(forged) == "dev-b"
    assert _reason(forged, device_id="dev-b") == "bad-signature"


def test_unknown_device_is_rejected() -> None:
    assert _reason(sign_payload(KEY_C, "dev-c", _payload("dev-c")), "dev-c") == "unknown-device"


@pytest.mark.parametrize("frame", [MAGIC, MAGIC + b"\x00\x00" + bytes(80),
                                   MAGIC + b"\xff\xff" + bytes(80),
                                   MAGIC + b"\x00\x02\xff\xfe" + bytes(80)])
def test_malformed_frames_are_decode_errors(frame: bytes) -> None:
    assert _reason(frame) == "malformed-frame"
    with pytest.raises(DecodeError):  # callers that catch DecodeError catch these too
        open_signed(REGISTRY, "dev-a", frame)


def test_device_id_is_bounded() -> None:
    with pytest.raises(ValueError):
        sign_payload(KEY_A, "", b"x")
    with pytest.raises(ValueError):
        sign_payload(KEY_A, "d" * 256, b"x")


def test_keys_and_registry_round_trip_through_files(tmp_path: Path) -> None:
    save_private_key(KEY_A, tmp_path / "a.key")
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    key = load_private_key(tmp_path / "a.key")
    (tmp_path / "registry.json").write_text(registry_to_json({"dev-a": public_key_bytes(key)}))
    registry = load_registry(tmp_path / "registry.json")
    assert open_signed(registry, "dev-a", sign_payload(KEY_A, "dev-a", b"payload")) == b"payload"


@pytest.mark.parametrize("text", ['{"schema": 2, "algorithm": "ed25519", "devices": {}}',
                                  '{"schema": 1, "algorithm": "rsa", "devices": {}}',
                                  '{"schema": 1, "algorithm": "ed25519", "devices": {"a": "zz"}}',
                                  '{"schema": 1, "algorithm": "ed25519", "devices": {"a": "00"}}',
                                  '[]'])
def test_bad_registry_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        registry_from_json(text)
