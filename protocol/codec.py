"""Encode and decode messages: a zstd frame around one safetensors file with a JSON header.

The safetensors `__metadata__` holds `schema` (the version), `kind` and `header` (the message's
scalar fields as JSON). Tensors are the adapter, for updates in one of the compact encodings of
protocol.quant. The frame is exactly one zstd frame with its content checksum. Nothing is
pickled, so decoding untrusted bytes cannot run code; the header must be strict JSON holding
exactly the documented keys, each in its documented range (the rules live in
protocol.messages). Every failure surfaces as DecodeError with a one-line reason.
docs/PROTOCOL.md is the language-neutral spec.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from typing import Any

import numpy as np
import safetensors.numpy
import zstandard

from protocol import quant
from protocol.messages import (
    GlobalModel,
    PartialSum,
    ResidualModel,
    Status,
    TrainConfig,
    Update,
    check_bool,
    check_int,
    check_metrics,
    check_segment,
    check_shape,
    check_slot,
    check_task_name,
    check_token,
)
from protocol.residual import residual_layers
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
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first 4 bytes (RFC 8878)


# Tensor-name prefix of a global's residual step factors; "/" never occurs in adapter names.
RESIDUAL_PREFIX = "residual_step/"
# FL-TAC cluster k's adapter travels as "cluster/<k>/<name>".
CLUSTER_PREFIX = "cluster/"


class DecodeError(ValueError):
    """Bytes that are not a valid message of the expected kind and schema."""


class PayloadTooLarge(ValueError):
    """An encoded message over MAX_PAYLOAD_BYTES: devices would reject it (see _unpack)."""


def _pack(kind: str, header: dict[str, Any], tensors: TensorDict) -> bytes:
    # allow_nan=False: a header a receiver would refuse (NaN, Infinity) fails here instead.
    metadata = {"schema": str(SCHEMA_VERSION), "kind": kind,
                "header": json.dumps(header, allow_nan=False)}
    # safetensors wants C-contiguous arrays (a no-op when they already are); not
    # np.ascontiguousarray, which would turn a 0-d tensor into shape (1,).
    contiguous = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    raw = safetensors.numpy.save(contiguous, metadata=metadata)
    return compress_frame(raw)


def compress_frame(raw: bytes) -> bytes:
    """One zstd frame around `raw`, with its content size and content checksum (section 3)."""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(raw)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (making one per payload cost a gateway ~30 µs an update;
    one instance must not be shared between threads)."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _decompress_frame(data: bytes | bytearray | memoryview) -> bytes:
    """The content of exactly one checksummed zstd frame, checked against its checksum."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DecodeError(f"payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES} limit")
    if bytes(data[:4]) != ZSTD_MAGIC:
        raise DecodeError("payload does not start with the zstd frame magic number")
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"not a zstd frame: {exc}") from exc
    if not params.has_checksum:
        raise DecodeError("zstd frame has no content checksum")
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and (
            params.content_size > MAX_DECOMPRESSED_BYTES):
        raise DecodeError(f"payload declares {params.content_size} bytes decompressed, over "
                          f"the {MAX_DECOMPRESSED_BYTES} limit")
    try:
        # One frame, nothing after it (allow_extra_data=False); zstd verifies the checksum.
        return _decompressor().decompress(
            data, max_output_size=MAX_DECOMPRESSED_BYTES, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"invalid zstd frame: {exc}") from exc


def _unpack(data: bytes, kind: str) -> tuple[dict[str, Any], TensorDict]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
    raw = _decompress_frame(data)
    metadata = _read_metadata(raw)
    if metadata["schema"] != str(SCHEMA_VERSION):
        raise DecodeError(f"schema version {_show(metadata['schema'])} is not supported "
                          f"(expected {SCHEMA_VERSION})")
    if metadata["kind"] != kind:
        raise DecodeError(f"expected a {kind!r} message, got {_show(metadata['kind'])}")
    header = strict_json(metadata["header"], "header")
    if not isinstance(header, dict):
        raise DecodeError("header is not a JSON object")
    try:
        tensors = safetensors.numpy.load(raw)
    except Exception as exc:  # safetensors raises its own error types for malformed bodies
        raise DecodeError(f"malformed message body: {_one_line(exc)}") from exc
    return header, tensors


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _show(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def strict_json(text: str | bytes, what: str) -> Any:
    """Parse JSON as the protocol allows it, raising DecodeError otherwise.

    Refused: NaN, Infinity and -Infinity; numbers too large for a float64 (1e400); duplicate
    keys in an object; strings that UTF-8 cannot encode (lone surrogates, e.g. "\\ud800");
    bytes that are not UTF-8; nesting deeper than the parser allows.
    """
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)  # built in C: this hook runs for every object of every header
        if len(obj) != len(items):
            seen: set[str] = set()
            duplicate = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise DecodeError(f"{what}: duplicate key {_show(duplicate)}")
        return obj

    def constant(name: str) -> Any:
        raise DecodeError(f"{what}: {name} is not allowed")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise DecodeError(f"{what}: number {_show(literal)} is out of range")
        return value

    try:
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8")
        else:
            text.encode("utf-8")  # a str may hold lone surrogates itself
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant,
                           parse_float=number)
    except DecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeError, ...
        raise DecodeError(f"{what} is not valid JSON: {_one_line(exc)}") from exc
    # Valid UTF-8 text yields a lone surrogate only through a \uD800-\uDFFF escape: look for
    # one in the text (cheap) before walking every string of the value (not cheap).
    if _SURROGATE_ESCAPE.search(text) is None:
        return value
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise DecodeError(f"{what}: string {_show(item)} is not valid UTF-8") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


_METADATA_KEYS = frozenset({"schema", "kind", "header"})


def _read_metadata(raw: bytes) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(raw) < 8:
        raise DecodeError("truncated safetensors header")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > len(raw) - 8:
        raise DecodeError("safetensors header length exceeds the payload")
    header = strict_json(raw[8 : 8 + length], "safetensors header")
    if not isinstance(header, dict):
        raise DecodeError("safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise DecodeError("safetensors metadata is missing or not an object")
    if set(metadata) != _METADATA_KEYS or not all(
            isinstance(v, str) for v in metadata.values()):
        raise DecodeError(f"safetensors metadata must hold exactly the strings "
                          f"{sorted(_METADATA_KEYS)}, got keys {_show(sorted(metadata))}")
    return metadata


def _check_keys(header: dict[str, Any], required: frozenset[str], optional: frozenset[str],
                what: str = "header") -> None:
    missing = sorted(required - header.keys())
    if missing:
        raise DecodeError(f"{what} field {missing[0]!r} is missing")
    unknown = sorted(header.keys() - required - optional)
    if unknown:
        raise DecodeError(f"unknown {what} field {_show(unknown[0])}")


def _checked(check: Any, *args: Any, prefix: str = "header field ") -> Any:
    """Run a protocol.messages check, turning its ValueError into DecodeError."""
    try:
        return check(*args)
    except ValueError as exc:
        raise DecodeError(f"{prefix}{exc}") from exc


def _field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    # bool is an int subclass; a True round number is not a round number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"header field {name!r} must be {kind.__name__}, got {_show(value)}")
    return value


def _number(header: dict[str, Any], name: str) -> float:
    # JSON has one number type: another language may write 1 where Python writes 1.0.
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f"header field {name!r} must be a number, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float64
        raise DecodeError(f"header field {name!r} is out of range: {_show(value)}") from None


def _optional_number(header: dict[str, Any], name: str) -> float | None:
    if name not in header:  # required, even though its value may be null
        raise DecodeError(f"header field {name!r} is missing")
    return None if header[name] is None else _number(header, name)


def _shapes(header: dict[str, Any], sparse: bool) -> dict[str, tuple[int, ...]] | None:
    if not sparse:
        if "shapes" in header:
            raise DecodeError("header field 'shapes' is only valid with topk")
        return None
    raw = header.get("shapes")
    if not isinstance(raw, dict):
        raise DecodeError("header field 'shapes' must map tensor names to lists of sizes >= 0")
    return {name: _checked(check_shape, shape, f"'shapes' of {_show(name)}")
            for name, shape in raw.items()}


def encode_global(message: GlobalModel) -> bytes:
    """Serialise a GlobalModel (its adapter always travels as dense float32).

    Raises:
        PayloadTooLarge: the encoded global would exceed MAX_PAYLOAD_BYTES.
    """
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
    if message.residual:
        header["residual"] = True
    payload = _pack("global", header, join_global_tensors(
        message.adapter, message.residual_step, message.clusters))
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"global of round {message.round} encodes to {len(payload)} bytes, over the "
            f"{MAX_PAYLOAD_BYTES}-byte limit; it carries {_nbytes(message.adapter)} bytes of "
            f"adapter ({len(message.adapter)} tensors), {_nbytes(message.residual_step)} of "
            f"residual step and {sum(_nbytes(c) for c in message.clusters)} of clusters "
            f"({len(message.clusters)})")
    return payload


def encode_residual(message: ResidualModel) -> bytes:
    """Serialise a ResidualModel (the residual topic's retained message).

    Raises:
        PayloadTooLarge: the encoded message would exceed MAX_PAYLOAD_BYTES.
    """
    header = {"federation": message.federation, "round": message.round,
              "manifest_sha256": message.manifest_sha256,
              "truncation_error": float(message.truncation_error)}
    payload = _pack("residual", header, message.residual)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"residual of round {message.round} encodes to {len(payload)} bytes, over the "
            f"{MAX_PAYLOAD_BYTES}-byte limit ({len(message.residual)} tensors)")
    return payload


_RESIDUAL_KEYS = frozenset({"federation", "round", "manifest_sha256", "truncation_error"})


def decode_residual(data: bytes) -> ResidualModel:
    """Parse a ResidualModel, raising DecodeError on anything malformed (docs/PROTOCOL.md §4.2)."""
    header, tensors = _unpack(data, "residual")
    _check_keys(header, _RESIDUAL_KEYS, frozenset())
    try:
        residual_layers(tensors)
        return ResidualModel(
            federation=_checked(check_segment, header["federation"], "'federation'"),
            round=_checked(check_int, header["round"], "'round'", 0),
            manifest_sha256=_checked(check_token, header["manifest_sha256"], "'manifest_sha256'"),
            residual=tensors,
            truncation_error=_number(header, "truncation_error"),
        )
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(str(exc)) from exc


def _nbytes(tensors: TensorDict) -> int:
    return sum(np.asarray(v).nbytes for v in tensors.values())


def join_global_tensors(adapter: TensorDict, residual_step: TensorDict,
                        clusters: tuple[TensorDict, ...] = ()) -> TensorDict:
    """A global's tensors in one flat dict, as on the wire."""
    residual = {RESIDUAL_PREFIX + k: v for k, v in residual_step.items()}
    clustered = {f"{CLUSTER_PREFIX}{i}/{k}": v
                 for i, cluster in enumerate(clusters) for k, v in cluster.items()}
    return adapter | residual | clustered


def split_global_tensors(
    tensors: TensorDict,
) -> tuple[TensorDict, TensorDict, tuple[TensorDict, ...]]:
    """Inverse of join_global_tensors: (adapter, residual step factors, cluster adapters).

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
            # Canonical decimal (no sign, no leading zero), short enough for int() to be cheap.
            if not re.fullmatch(r"0|[1-9][0-9]{0,8}", index) or not key:
                raise DecodeError(f"malformed cluster tensor name {_show(name)}")
            found.setdefault(int(index), {})[key] = value
        else:
            adapter[name] = value
    if sorted(found) != list(range(len(found))):
        raise DecodeError(f"cluster indices {sorted(found)} are not 0..K-1")
    return adapter, residual, tuple(found[i] for i in range(len(found)))


_GLOBAL_KEYS = frozenset({"federation", "round", "manifest_sha256", "local_steps",
                          "learning_rate", "update_encoding", "update_topk", "final"})
_GLOBAL_OPTIONAL = frozenset({"assignment", "task_index", "task_classes", "residual"})


def _assignment(header: dict[str, Any]) -> dict[str, int]:
    raw = header.get("assignment", {})
    if not isinstance(raw, dict):
        raise DecodeError("header field 'assignment' must map slot names to integers")
    for slot, cluster in raw.items():
        _checked(check_slot, slot, prefix="header field 'assignment': ")
        _checked(check_int, cluster, f"'assignment' of {_show(slot)}", 0)
    return dict(raw)


def _task(header: dict[str, Any]) -> tuple[int | None, tuple[int, ...] | None]:
    if "task_classes" not in header and "task_index" not in header:
        return None, None
    classes = header.get("task_classes")
    if not isinstance(classes, list) or not classes:
        raise DecodeError("header field 'task_classes' must be a non-empty list of integers")
    for c in classes:
        _checked(check_int, c, "'task_classes' entry", 0)
    return _checked(check_int, header.get("task_index"), "'task_index'", 0), tuple(classes)


def decode_global(data: bytes) -> GlobalModel:
    """Parse a GlobalModel, raising DecodeError on anything malformed (docs/PROTOCOL.md §4)."""
    header, tensors = _unpack(data, "global")
    _check_keys(header, _GLOBAL_KEYS, _GLOBAL_OPTIONAL)
    federation = _checked(check_segment, header["federation"], "'federation'")
    round_number = _checked(check_int, header["round"], "'round'", 0)
    manifest_sha256 = _checked(check_token, header["manifest_sha256"], "'manifest_sha256'")
    local_steps = _checked(check_int, header["local_steps"], "'local_steps'", 1)
    final = _checked(check_bool, header["final"], "'final'")
    try:
        train = TrainConfig(
            local_steps=local_steps,
            learning_rate=_number(header, "learning_rate"),
            update_encoding=_field(header, "update_encoding", str),
            update_topk=_optional_number(header, "update_topk"),
        )
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(str(exc)) from exc
    assignment = _assignment(header)
    task_index, task_classes = _task(header)
    folds_residual = _checked(check_bool, header.get("residual", False), "'residual'")
    if "residual" in header and not folds_residual:
        raise DecodeError("header field 'residual' is written only as true")
    adapter, residual, clusters = split_global_tensors(tensors)
    if residual:
        _checked(residual_layers, residual, prefix="residual step: ")
    try:
        return GlobalModel(
            federation=federation,
            round=round_number,
            manifest_sha256=manifest_sha256,
            adapter=adapter,
            train=train,
            final=final,
            residual_step=residual,
            clusters=clusters,
            assignment=assignment,
            task_index=task_index,
            task_classes=task_classes,
            residual=folds_residual,
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


_UPDATE_KEYS = frozenset({"federation", "round", "device_id", "manifest_sha256",
                          "num_samples", "update_id", "is_delta", "encoding", "topk"})
_UPDATE_OPTIONAL = frozenset({"metrics", "task", "shapes"})


def decode_update(data: bytes) -> Update:
    """Parse an Update into dense float32 tensors, raising DecodeError on anything malformed.

    Every header rule of docs/PROTOCOL.md §5 is checked before any tensor is decoded.
    """
    header, tensors = _unpack(data, "update")
    _check_keys(header, _UPDATE_KEYS, _UPDATE_OPTIONAL)
    federation = _checked(check_segment, header["federation"], "'federation'")
    round_number = _checked(check_int, header["round"], "'round'", 0)
    device_id = _checked(check_segment, header["device_id"], "'device_id'")
    manifest_sha256 = _checked(check_token, header["manifest_sha256"], "'manifest_sha256'")
    num_samples = _checked(check_int, header["num_samples"], "'num_samples'", 1)
    update_id = _checked(check_token, header["update_id"], "'update_id'")
    metrics = _checked(check_metrics, header.get("metrics", {}),
                       prefix="header field 'metrics': ")
    is_delta = _checked(check_bool, header["is_delta"], "'is_delta'")
    task = header.get("task", "")
    if "task" in header:  # present: a slot name of 1-32 characters
        if not isinstance(task, str) or not task:
            raise DecodeError(f"header field 'task' must be a non-empty string, got {_show(task)}")
        _checked(check_task_name, task, prefix="header field 'task': ")
    try:
        encoding = quant.check_encoding(_field(header, "encoding", str))
        topk = quant.check_topk(_optional_number(header, "topk"))
        shapes = _shapes(header, sparse=topk is not None)
        # Header first, tensors last: the cheap checks reject most bad payloads before any
        # dequantising or allocation.
        adapter = quant.decode_tensors(tensors, encoding, shapes, MAX_DENSE_BYTES)
        return Update(
            federation=federation, round=round_number, device_id=device_id,
            manifest_sha256=manifest_sha256, num_samples=num_samples, update_id=update_id,
            adapter=adapter, metrics=metrics, is_delta=is_delta, task=task,
        )
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(_one_line(exc)) from exc


def encode_partial(message: PartialSum) -> bytes:
    """Serialise a gateway's PartialSum (float64 sums, lossless: the merge must be exact)."""
    header: dict[str, Any] = {
        "federation": message.federation, "round": message.round,
        "gateway_id": message.gateway_id, "manifest_sha256": message.manifest_sha256,
        "weight": float(message.weight), "count": message.count,
        "metric_sums": message.metric_sums, "bytes": message.bytes,
    }
    return _pack("partial", header, {k: np.asarray(v, np.float64) for k, v in
                                     message.sums.items()})


_PARTIAL_KEYS = frozenset({"federation", "round", "gateway_id", "manifest_sha256", "weight",
                           "count", "metric_sums", "bytes"})


def decode_partial(data: bytes) -> PartialSum:
    """Parse a PartialSum, raising DecodeError on anything malformed (float64 tensors only)."""
    header, tensors = _unpack(data, "partial")
    _check_keys(header, _PARTIAL_KEYS, frozenset())
    for name, tensor in tensors.items():
        if tensor.dtype != np.float64:
            raise DecodeError(f"partial sum tensor {name!r} is {tensor.dtype}, not float64")
    try:
        return PartialSum(
            federation=header["federation"], round=header["round"],
            gateway_id=header["gateway_id"], manifest_sha256=header["manifest_sha256"],
            weight=_number(header, "weight"), count=header["count"], sums=tensors,
            metric_sums=header["metric_sums"], bytes=header["bytes"])
    except ValueError as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(_one_line(exc)) from exc


# Bound on a status payload: a device id of 255 UTF-8 bytes, \u-escaped, fits several times.
MAX_STATUS_BYTES = 4096
_STATUS_KEYS = frozenset({"schema", "device_id", "online"})


def encode_status(online: bool, device_id: str, problem: str | None = None) -> bytes:
    """A device's presence, as small JSON (it is also the MQTT last will).

    `problem` (one of protocol.messages.STATUS_PROBLEMS, e.g. "manifest") says what keeps an
    online device from taking part; it is written only when set.
    """
    status = Status(device_id, online, problem)  # validates
    fields: dict[str, Any] = {"schema": SCHEMA_VERSION, "device_id": status.device_id,
                              "online": status.online}
    if status.problem is not None:
        fields["problem"] = status.problem
    return json.dumps(fields).encode()


def decode_status(data: bytes) -> Status:
    """Parse a status message (docs/PROTOCOL.md §2), raising DecodeError if malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"status must be bytes, got {type(data).__name__}")
    if len(data) > MAX_STATUS_BYTES:
        raise DecodeError(f"status of {len(data)} bytes exceeds the {MAX_STATUS_BYTES} limit")
    raw = strict_json(bytes(data), "status")
    if not isinstance(raw, dict):
        raise DecodeError("status is not a JSON object")
    _check_keys(raw, _STATUS_KEYS, frozenset({"problem"}), "status")
    schema = raw["schema"]
    if isinstance(schema, bool) or schema != SCHEMA_VERSION or not isinstance(schema, int):
        raise DecodeError(f"status schema {_show(schema)} is not supported "
                          f"(expected {SCHEMA_VERSION})")
    problem = raw.get("problem")
    if "problem" in raw and not isinstance(problem, str):
        raise DecodeError(f"status field 'problem' must be a string, got {_show(problem)}")
    try:
        return Status(raw["device_id"], raw["online"], problem)
    except ValueError as exc:
        raise DecodeError(f"status field {exc}") from exc
