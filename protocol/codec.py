"""Encode and decode messages: a zstd frame around one safetensors file with a JSON header.

The safetensors `__metadata__` holds `schema` (the version), `kind` and `header` (the message's
scalar fields as JSON). Tensors are the adapter, for updates in one of the compact encodings of
protocol.quant. Nothing is pickled, so decoding untrusted bytes cannot run code; every failure
surfaces as DecodeError with the reason. docs/PROTOCOL.md is the language-neutral spec.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import safetensors.numpy
import zstandard

from protocol import quant
from protocol.messages import GlobalModel, TrainConfig, Update
from protocol.tensors import TensorDict

SCHEMA_VERSION = 1
# Mosquitto's default message_size_limit is 256 MiB, but a gateway broker serving thousands of
# devices should not carry that; 8 MiB fits a MiniLM r=8 adapter (~300 KB fp32) many times over.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
# Bound on the decompressed size, so a tiny zstd "bomb" cannot exhaust the gateway's memory.
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
# Bound on a decoded update's dense float32 tensors: top-k indices name positions in shapes
# the header declares, so a few bytes could otherwise ask for gigabytes of zeros.
MAX_DENSE_BYTES = MAX_DECOMPRESSED_BYTES
_ZSTD_LEVEL = 3  # zstd's default: most of the gain, fast on a phone


# Tensor-name prefix of a global's residual factors; "/" never occurs in adapter names.
RESIDUAL_PREFIX = "base_residual/"
# FL-TAC cluster k's adapter travels as "cluster/<k>/<name>".
CLUSTER_PREFIX = "cluster/"


class DecodeError(ValueError):
    """Bytes that are not a valid message of the expected kind and schema."""


class PayloadTooLarge(ValueError):
    """An encoded message over MAX_PAYLOAD_BYTES: devices would reject it (see _unpack)."""


def _pack(kind: str, header: dict[str, Any], tensors: TensorDict) -> bytes:
    metadata = {"schema": str(SCHEMA_VERSION), "kind": kind, "header": json.dumps(header)}
    # safetensors wants C-contiguous arrays (a no-op when they already are); not
    # np.ascontiguousarray, which would turn a 0-d tensor into shape (1,).
    contiguous = {k: np.asarray(v, order="C") for k, v in tensors.items()}
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


def _number(header: dict[str, Any], name: str) -> float:
    # JSON has one number type: another language may write 1 where Python writes 1.0.
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f"header field {name!r} must be a number, got {value!r}")
    return float(value)


def _optional_number(header: dict[str, Any], name: str) -> float | None:
    if name not in header:  # required, even though its value may be null
        raise DecodeError(f"header field {name!r} is missing")
    return None if header[name] is None else _number(header, name)


def _shapes(header: dict[str, Any], sparse: bool) -> dict[str, tuple[int, ...]] | None:
    raw = header.get("shapes")
    if not sparse:
        if raw is not None:
            raise DecodeError("header field 'shapes' is only valid with topk")
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        for shape in raw.values()
    ):
        raise DecodeError("header field 'shapes' must map tensor names to lists of sizes >= 0")
    return {str(name): tuple(shape) for name, shape in raw.items()}


def encode_global(message: GlobalModel) -> bytes:
    """Serialise a GlobalModel (its adapter always travels as dense float32)."""
    header = {
        "federation": message.federation,
        "round": message.round,
        "manifest_sha256": message.manifest_sha256,
        "local_steps": message.train.local_steps,
        "learning_rate": message.train.learning_rate,
        "update_encoding": message.train.update_encoding,
        "update_topk": message.train.update_topk,
        "final": message.final,
    }
    # Optional fields are written only when used, so plain globals keep their v1 bytes.
    if message.assignment:
        header["assignment"] = message.assignment
    if message.task_classes is not None:
        header["task_index"] = message.task_index
        header["task_classes"] = list(message.task_classes)
    payload = _pack("global", header, join_global_tensors(
        message.adapter, message.base_residual, message.clusters))
    if len(payload) > MAX_PAYLOAD_BYTES:
        residual = message.base_residual
        rank = max((np.shape(v)[-1] for k, v in residual.items() if k.endswith(".U")), default=0)
        raise PayloadTooLarge(
            f"global of round {message.round} encodes to {len(payload)} bytes, over the "
            f"{MAX_PAYLOAD_BYTES}-byte limit; it carries {_nbytes(message.adapter)} bytes of "
            f"adapter ({len(message.adapter)} tensors), {_nbytes(residual)} of base_residual "
            f"({len(residual)} factors, rank up to {rank}) and "
            f"{sum(_nbytes(c) for c in message.clusters)} of clusters ({len(message.clusters)})")
    return payload


def _nbytes(tensors: TensorDict) -> int:
    return sum(np.asarray(v).nbytes for v in tensors.values())


def join_global_tensors(adapter: TensorDict, base_residual: TensorDict,
                        clusters: tuple[TensorDict, ...] = ()) -> TensorDict:
    """A global's tensors in one flat dict (as on the wire; the aggregator stores it so too)."""
    residual = {RESIDUAL_PREFIX + k: v for k, v in base_residual.items()}
    clustered = {f"{CLUSTER_PREFIX}{i}/{k}": v
                 for i, cluster in enumerate(clusters) for k, v in cluster.items()}
    return adapter | residual | clustered


def split_global_tensors(
    tensors: TensorDict,
) -> tuple[TensorDict, TensorDict, tuple[TensorDict, ...]]:
    """Inverse of join_global_tensors: (adapter, residual factors, cluster adapters).

    Raises:
        DecodeError: a cluster tensor name without an index, or indices other than 0..K-1.
    """
    adapter: TensorDict = {}
    residual: TensorDict = {}
    found: dict[int, TensorDict] = {}
    for name, value in tensors.items():
        if name.startswith(RESIDUAL_PREFIX):
            residual[name.removeprefix(RESIDUAL_PREFIX)] = value
        elif name.startswith(CLUSTER_PREFIX):
            index, _, key = name.removeprefix(CLUSTER_PREFIX).partition("/")
            if not index.isdigit() or not key:
                raise DecodeError(f"malformed cluster tensor name {name!r}")
            found.setdefault(int(index), {})[key] = value
        else:
            adapter[name] = value
    if sorted(found) != list(range(len(found))):
        raise DecodeError(f"cluster indices {sorted(found)} are not 0..K-1")
    return adapter, residual, tuple(found[i] for i in range(len(found)))


def _assignment(header: dict[str, Any]) -> dict[str, int]:
    raw = header.get("assignment", {})
    if not isinstance(raw, dict) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in raw.values()):
        raise DecodeError("header field 'assignment' must map slot names to integers")
    return {str(slot): c for slot, c in raw.items()}


def _task(header: dict[str, Any]) -> tuple[int | None, tuple[int, ...] | None]:
    if "task_classes" not in header and "task_index" not in header:
        return None, None
    classes = header.get("task_classes")
    if not isinstance(classes, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in classes):
        raise DecodeError("header field 'task_classes' must be a list of integers")
    return _field(header, "task_index", int), tuple(classes)


def decode_global(data: bytes) -> GlobalModel:
    """Parse a GlobalModel, raising DecodeError on anything malformed."""
    header, tensors = _unpack(data, "global")
    try:
        train = TrainConfig(
            local_steps=_field(header, "local_steps", int),
            learning_rate=_number(header, "learning_rate"),
            update_encoding=_field(header, "update_encoding", str),
            update_topk=_optional_number(header, "update_topk"),
        )
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(str(exc)) from exc
    task_index, task_classes = _task(header)
    adapter, residual, clusters = split_global_tensors(tensors)
    try:
        return GlobalModel(
            federation=_field(header, "federation", str),
            round=_field(header, "round", int),
            manifest_sha256=_field(header, "manifest_sha256", str),
            adapter=adapter,
            train=train,
            final=_field(header, "final", bool),
            base_residual=residual,
            clusters=clusters,
            assignment=_assignment(header),
            task_index=task_index,
            task_classes=task_classes,
        )
    except ValueError as exc:  # GlobalModel's own consistency checks
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(str(exc)) from exc


def encode_update(message: Update, encoding: str = "fp32", topk: float | None = None) -> bytes:
    """Serialise an Update, compressing its adapter.

    Args:
        message: the update; its adapter holds float tensors of canonical names.
        encoding: one of protocol.quant.ENCODINGS (the global's `train.update_encoding`).
        topk: fraction of entries kept per tensor, or None for all (`train.update_topk`).

    Raises:
        ValueError: for an unknown encoding, a bad topk, or tensors the encoding cannot carry
            (see protocol.quant.encode_tensors).
    """
    wire = quant.encode_tensors(message.adapter, encoding, topk)
    header: dict[str, Any] = {
        "federation": message.federation,
        "round": message.round,
        "device_id": message.device_id,
        "manifest_sha256": message.manifest_sha256,
        "num_samples": message.num_samples,
        "update_id": message.update_id,
        "metrics": message.metrics,
        "is_delta": message.is_delta,
        "encoding": encoding,
        "topk": quant.check_topk(topk),
    }
    if message.task:  # written only when used, so single-task updates keep their v1 bytes
        header["task"] = message.task
    if topk is not None:  # sparse tensors no longer carry their shapes
        header["shapes"] = {name: list(np.shape(a)) for name, a in message.adapter.items()}
    return _pack("update", header, wire)


def decode_update(data: bytes) -> Update:
    """Parse an Update into dense float32 tensors, raising DecodeError on anything malformed."""
    header, tensors = _unpack(data, "update")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise DecodeError("header field 'metrics' must map names to numbers")
    try:
        # Header first, tensors last: the cheap checks reject most bad payloads before any
        # dequantising or allocation.
        federation = _field(header, "federation", str)
        round_number = _field(header, "round", int)
        device_id = _field(header, "device_id", str)
        manifest_sha256 = _field(header, "manifest_sha256", str)
        num_samples = _field(header, "num_samples", int)
        update_id = _field(header, "update_id", str)
        is_delta = _field(header, "is_delta", bool)
        task = _field(header, "task", str) if "task" in header else ""
        encoding = quant.check_encoding(_field(header, "encoding", str))
        topk = quant.check_topk(_optional_number(header, "topk"))
        adapter = quant.decode_tensors(
            tensors, encoding, _shapes(header, sparse=topk is not None), MAX_DENSE_BYTES
        )
        return Update(
            federation=federation, round=round_number, device_id=device_id,
            manifest_sha256=manifest_sha256, num_samples=num_samples, update_id=update_id,
            adapter=adapter, metrics={str(k): float(v) for k, v in metrics.items()},
            is_delta=is_delta, task=task,
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
