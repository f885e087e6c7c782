"""Encode and decode messages: a zstd frame around one safetensors file with a JSON header.

The safetensors `__metadata__` holds `schema` (the version), `kind` and `header` (the message's
scalar fields as JSON). Tensors are the adapter. Nothing is pickled, so decoding untrusted bytes
cannot run code; every failure surfaces as DecodeError with the reason.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import safetensors.numpy
import zstandard

from protocol.messages import GlobalModel, TrainConfig, Update
from protocol.tensors import TensorDict

SCHEMA_VERSION = 1
# Mosquitto's default message_size_limit is 256 MiB, but a gateway broker serving thousands of
# devices should not carry that; 8 MiB fits a MiniLM r=8 adapter (~300 KB fp32) many times over.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
# Bound on the decompressed size, so a tiny zstd "bomb" cannot exhaust the gateway's memory.
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
_ZSTD_LEVEL = 3  # zstd's default: most of the gain, fast on a phone


class DecodeError(ValueError):
    """Bytes that are not a valid message of the expected kind and schema."""


def _pack(kind: str, header: dict[str, Any], tensors: TensorDict) -> bytes:
    metadata = {"schema": str(SCHEMA_VERSION), "kind": kind, "header": json.dumps(header)}
    # safetensors wants C-contiguous arrays; np.ascontiguousarray is a no-op when they already are.
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    raw = safetensors.numpy.save(contiguous, metadata=metadata)
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)


def _unpack(data: bytes, kind: str) -> tuple[dict[str, Any], TensorDict]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DecodeError(f"payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES} limit")
    try:
        declared = zstandard.frame_content_size(data)
        if declared > MAX_DECOMPRESSED_BYTES:
            raise DecodeError(f"payload declares {declared} bytes decompressed, over the limit")
        raw = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=MAX_DECOMPRESSED_BYTES
        )
    except zstandard.ZstdError as exc:
        raise DecodeError(f"not a zstd frame: {exc}") from exc
    metadata = _read_metadata(raw)
    if metadata.get("schema") != str(SCHEMA_VERSION):
        raise DecodeError(
            f"schema version {metadata.get('schema')!r} is not supported (expected {SCHEMA_VERSION})"
        )
    if metadata.get("kind") != kind:
        raise DecodeError(f"expected a {kind!r} message, got {metadata.get('kind')!r}")
    try:
        header = json.loads(metadata["header"])
        tensors = safetensors.numpy.load(raw)
    except Exception as exc:  # safetensors raises its own error types for malformed bodies
        raise DecodeError(f"malformed message body: {exc}") from exc
    if not isinstance(header, dict):
        raise DecodeError("header is not a JSON object")
    return header, tensors


def _read_metadata(raw: bytes) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(raw) < 8:
        raise DecodeError("truncated safetensors header")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > len(raw) - 8:
        raise DecodeError("safetensors header length exceeds the payload")
    try:
        header = json.loads(raw[8 : 8 + length])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as exc:
        raise DecodeError(f"malformed safetensors header: {exc}") from exc
    if not isinstance(metadata, dict):
        raise DecodeError("safetensors metadata is not an object")
    return metadata


def _field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    # bool is an int subclass; a True round number is not a round number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"header field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def encode_global(message: GlobalModel) -> bytes:
    """Serialise a GlobalModel."""
    header = {
        "federation": message.federation,
        "round": message.round,
        "manifest_sha256": message.manifest_sha256,
        "local_steps": message.train.local_steps,
        "learning_rate": message.train.learning_rate,
        "final": message.final,
    }
    return _pack("global", header, message.adapter)


def decode_global(data: bytes) -> GlobalModel:
    """Parse a GlobalModel, raising DecodeError on anything malformed."""
    header, tensors = _unpack(data, "global")
    try:
        train = TrainConfig(
            _field(header, "local_steps", int), float(_field(header, "learning_rate", float))
        )
    except ValueError as exc:
        raise DecodeError(str(exc)) from exc
    return GlobalModel(
        federation=_field(header, "federation", str),
        round=_field(header, "round", int),
        manifest_sha256=_field(header, "manifest_sha256", str),
        adapter=tensors,
        train=train,
        final=_field(header, "final", bool),
    )


def encode_update(message: Update) -> bytes:
    """Serialise an Update."""
    header = {
        "federation": message.federation,
        "round": message.round,
        "device_id": message.device_id,
        "manifest_sha256": message.manifest_sha256,
        "num_samples": message.num_samples,
        "update_id": message.update_id,
        "metrics": message.metrics,
    }
    return _pack("update", header, message.adapter)


def decode_update(data: bytes) -> Update:
    """Parse an Update, raising DecodeError on anything malformed."""
    header, tensors = _unpack(data, "update")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise DecodeError("header field 'metrics' must map names to numbers")
    try:
        return Update(
            federation=_field(header, "federation", str),
            round=_field(header, "round", int),
            device_id=_field(header, "device_id", str),
            manifest_sha256=_field(header, "manifest_sha256", str),
            num_samples=_field(header, "num_samples", int),
            update_id=_field(header, "update_id", str),
            adapter=tensors,
            metrics={str(k): float(v) for k, v in metrics.items()},
        )
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(str(exc)) from exc


def encode_status(online: bool, device_id: str) -> bytes:
    """A device's presence, as small JSON (it is also the MQTT last will)."""
    return json.dumps({"schema": SCHEMA_VERSION, "device_id": device_id, "online": online}).encode()


def decode_status(data: bytes) -> tuple[str, bool]:
    """Parse a status message into (device id, online)."""
    try:
        raw = json.loads(data)
        return str(raw["device_id"]), bool(raw["online"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"malformed status message: {exc}") from exc
