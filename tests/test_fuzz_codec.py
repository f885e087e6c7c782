"""Bounded fuzzing of everything that parses untrusted bytes: only the documented errors escape.

The codec may raise DecodeError, the coordinator's validation Rejected, signed-frame opening
SignatureError; any other exception (IndexError, struct.error, MemoryError, a safetensors or
zstd error type...) would be a crash on attacker-controlled input.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.coordinator import AggregatorConfig, Coordinator, Rejected
from aggregator.store import GlobalStore
from aggregator.tiers import GatewayMerger
from protocol import codec, topics
from protocol.codec import DecodeError
from protocol.manifest import Manifest, TensorSpec
from protocol.messages import GlobalModel, PartialSum, TrainConfig, Update
from protocol.signing import (
    SignatureError,
    generate_signing_key,
    open_signed,
    public_key_bytes,
    registry_from_json,
    registry_to_json,
    sign_payload,
)
from tests.conftest import make_adapter

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FED, DEVICE = "fuzz", "dev-1"
SHAPES = {"fc1.lora_A.weight": (2, 8), "fc1.lora_B.weight": (4, 2), "head.bias": (3,)}
MANIFEST = Manifest(
    workload="fuzz", base_sha256="0" * 64, batch_size=2, input_shape=(2, 8),
    input_dtype="float32", labels=("a", "b", "c"), lora={"r": 2},
    tensors=tuple(TensorSpec(name, name, shape) for name, shape in SHAPES.items()),
)


def _update(**overrides: Any) -> Update:
    fields: dict[str, Any] = dict(
        federation=FED, round=0, device_id=DEVICE, manifest_sha256=MANIFEST.sha256,
        num_samples=64, update_id="u-1", adapter=make_adapter(1, SHAPES),
        metrics={"train_loss": 0.5})
    fields.update(overrides)
    return Update(**fields)


def _valid_updates() -> list[bytes]:
    payloads = [codec.encode_update(_update())]
    try:  # compact encodings, where the codec offers them
        from protocol.quant import ENCODINGS

        payloads += [codec.encode_update(_update(), encoding=e) for e in ENCODINGS]
        payloads += [codec.encode_update(_update(), encoding=e, topk=0.5) for e in ENCODINGS]
    except ImportError:
        pass
    return payloads


VALID_UPDATES = _valid_updates()
VALID_GLOBAL = codec.encode_global(GlobalModel(FED, 2, MANIFEST.sha256, make_adapter(2, SHAPES),
                                               TrainConfig(5, 0.1)))
KEY = generate_signing_key()
REGISTRY = registry_from_json(registry_to_json({DEVICE: public_key_bytes(KEY)}))


class StubTransport:
    """The Transport seam, in memory: records publishes, never delivers anything."""

    bytes_sent = 0
    connected = True

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.bytes_sent += len(payload)

    def receive(self, timeout: float | None = None) -> None:
        return None

    def ack(self, message: object) -> None: ...


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Coordinator]:
    # Module-scoped (hypothesis re-runs the test body, not the fixtures); validate() never
    # mutates state, so sharing it between examples is sound.
    folder = Path(tempfile.mkdtemp(prefix="edgefl-fuzz-"))
    config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=2, min_clients=1)
    yield Coordinator(config, MANIFEST, make_adapter(0, SHAPES), StubTransport(),
                      GlobalStore(folder))
    shutil.rmtree(folder, ignore_errors=True)


# -- mutations -------------------------------------------------------------------------------
def _decompressed(payload: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload)


def _compress(raw: bytes) -> bytes:
    # With the content checksum the decoder requires, so mutated bodies reach the parsers.
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw)


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, overwrite, insert, delete or truncate a few bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x30, 0x39, ord("{"),
                                            ord('"'), ord("["), ord("\\")]))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12,
)


def _rebuild(raw: bytes, edit: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> bytes:
    """Decode a safetensors blob, let `edit` change its header fields and tensors, re-encode."""
    (length,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    header = json.loads(metadata["header"])
    tensors = dict(safetensors.numpy.load(raw))
    edit(header, tensors)
    metadata = {**metadata, "header": json.dumps(header)}
    return safetensors.numpy.save(tensors, metadata=metadata)


@st.composite
def header_mutations(draw: st.DrawFn, payload: bytes) -> bytes:
    """A structurally valid frame whose JSON fields or tensors are replaced or removed."""
    raw = _decompressed(payload)
    (length,) = struct.unpack("<Q", raw[:8])
    fields = sorted(json.loads(json.loads(raw[8 : 8 + length])["__metadata__"]["header"]))
    names = sorted(safetensors.numpy.load(raw))
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["set", "delete", "tensor", "drop-tensor"]),
        st.sampled_from(fields + ["shapes", "extra"]), st.sampled_from(names), JSON,
        st.sampled_from(["float32", "float16", "int8", "int32", "uint8", "int64", "bool"]),
        st.lists(st.integers(0, 5), max_size=3),
        st.sampled_from([0.0, np.nan, np.inf, -1e38, 127]),
    ), min_size=1, max_size=4))

    def edit(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        for op, field, name, value, dtype, shape, fill in ops:
            if op == "set":
                header[field] = value
            elif op == "delete":
                header.pop(field, None)
            elif op == "tensor":
                with np.errstate(invalid="ignore", over="ignore"):
                    tensors[name] = np.full(shape, fill).astype(dtype)
            elif op == "drop-tensor":
                tensors.pop(name, None)

    raw = _rebuild(raw, edit)
    return _compress(raw)


def _any_update_payload() -> st.SearchStrategy[bytes]:
    valid = st.sampled_from(VALID_UPDATES)
    return st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=512).map(_compress),
        valid.flatmap(byte_mutations),
        valid.map(_decompressed).flatmap(byte_mutations).map(_compress),
        valid.flatmap(header_mutations),
    )


# -- properties ------------------------------------------------------------------------------
def _decodes_or_decode_error(decode: Callable[[bytes], object], payload: bytes) -> None:
    try:
        decode(payload)
    except DecodeError:
        pass


@FUZZ
@given(payload=_any_update_payload())
def test_decode_update_raises_only_decode_error(payload: bytes) -> None:
    _decodes_or_decode_error(codec.decode_update, payload)


@FUZZ
@given(payload=st.one_of(
    st.binary(max_size=512), st.binary(max_size=512).map(_compress),
    byte_mutations(VALID_GLOBAL), byte_mutations(_decompressed(VALID_GLOBAL)).map(_compress),
    header_mutations(VALID_GLOBAL), st.sampled_from(VALID_UPDATES),
))
def test_decode_global_raises_only_decode_error(payload: bytes) -> None:
    _decodes_or_decode_error(codec.decode_global, payload)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=128), JSON.map(lambda v: json.dumps(v).encode())))
def test_decode_status_raises_only_decode_error(payload: bytes) -> None:
    _decodes_or_decode_error(codec.decode_status, payload)


@FUZZ
@given(payload=_any_update_payload(),
       topic=st.one_of(st.just(topics.update_topic(FED, DEVICE)), st.text(max_size=40),
                       st.builds(lambda d: f"fl/v1/{FED}/update/{d}", st.text(max_size=10))))
def test_coordinator_validate_raises_only_rejected(coordinator: Coordinator, payload: bytes,
                                                   topic: str) -> None:
    try:
        coordinator.validate(topic, payload)
    except Rejected:
        pass


def test_unmutated_payloads_pass_validation(coordinator: Coordinator) -> None:
    # The fuzzed seeds are valid: mutations start from payloads the coordinator accepts.
    for payload in VALID_UPDATES:
        assert coordinator.validate(topics.update_topic(FED, DEVICE), payload).device_id == DEVICE


@FUZZ
@given(frame=st.one_of(st.binary(max_size=256),
                       byte_mutations(sign_payload(KEY, DEVICE, VALID_UPDATES[0]))),
       device_id=st.sampled_from([DEVICE, "dev-2", ""]))
def test_open_signed_raises_only_signature_error(frame: bytes, device_id: str) -> None:
    try:
        payload = open_signed(REGISTRY, device_id, frame)
    except SignatureError:
        return
    assert payload == VALID_UPDATES[0]  # anything that verifies is the signed payload itself


# -- partial sums between aggregators (a gateway is as untrusted as a device) ----------------
VALID_PARTIAL = codec.encode_partial(PartialSum(
    FED, 0, "g1", MANIFEST.sha256, 96.0, 2,
    {k: v.astype(np.float64) * 96.0 for k, v in make_adapter(3, SHAPES).items()},
    {"train_loss": 48.0}, 1234))


@pytest.fixture(scope="module")
def merger() -> Iterator[GatewayMerger]:
    folder = Path(tempfile.mkdtemp(prefix="edgefl-fuzz-"))
    config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=2, min_clients=1,
                              allowed_devices=frozenset({"g1", "g2"}))
    yield GatewayMerger(config, MANIFEST, make_adapter(0, SHAPES), StubTransport(),
                        GlobalStore(folder))
    shutil.rmtree(folder, ignore_errors=True)


_ANY_PARTIAL = st.one_of(
    st.binary(max_size=512), st.binary(max_size=512).map(_compress),
    byte_mutations(VALID_PARTIAL), byte_mutations(_decompressed(VALID_PARTIAL)).map(_compress),
    header_mutations(VALID_PARTIAL), st.sampled_from(VALID_UPDATES),
)


@FUZZ
@given(payload=_ANY_PARTIAL)
def test_decode_partial_raises_only_decode_error(payload: bytes) -> None:
    _decodes_or_decode_error(codec.decode_partial, payload)


@FUZZ
@given(payload=_ANY_PARTIAL, topic=st.one_of(st.just(topics.partial_topic(FED, "g1")),
                                            st.text(max_size=40)))
def test_upstream_validate_raises_only_rejected(merger: GatewayMerger, payload: bytes,
                                                topic: str) -> None:
    try:
        merger.validate(topic, payload)
    except Rejected:
        pass


def test_the_unmutated_partial_passes_upstream_validation(merger: GatewayMerger) -> None:
    assert merger.validate(topics.partial_topic(FED, "g1"), VALID_PARTIAL).weight == 96.0
