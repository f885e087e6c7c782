"""The aggregator's signing registry follows `edgefl gateway enroll|revoke` without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.signing import (
    RegistryFile,
    SignatureError,
    generate_signing_key,
    open_signed,
    public_key_bytes,
    registry_to_json,
    sign_payload,
)


def _write(path: Path, keys: dict, bump: int) -> None:
    path.write_text(registry_to_json({d: public_key_bytes(k) for d, k in keys.items()}))
    os.utime(path, ns=(bump, bump))  # a distinct mtime even within one clock tick


def test_enrolled_and_revoked_devices_count_at_once(tmp_path: Path) -> None:
    path = tmp_path / "signing_registry.json"
    a, b = generate_signing_key(), generate_signing_key()
    _write(path, {"a": a}, 1_000_000_000)
    registry = RegistryFile(path)
    frame_b = sign_payload(b, "b", b"update")
    with pytest.raises(SignatureError):
        open_signed(registry, "b", frame_b)  # not enrolled yet

    _write(path, {"a": a, "b": b}, 2_000_000_000)  # enrol b
    assert open_signed(registry, "b", frame_b) == b"update"

    _write(path, {"b": b}, 3_000_000_000)  # revoke a
    with pytest.raises(SignatureError):
        open_signed(registry, "a", sign_payload(a, "a", b"update"))

    path.write_text("{ half written")  # a broken file keeps the last good registry
    os.utime(path, ns=(4_000_000_000, 4_000_000_000))
    assert open_signed(registry, "b", frame_b) == b"update"
