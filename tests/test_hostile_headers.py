"""Hostile *headers* in well-formed frames: decoding yields a message that obeys every documented
rule (docs/PROTOCOL.md sections 2, 3 and 5), or DecodeError; never any other exception.

The frames here are valid zstd (one frame, content checksum) around valid safetensors, so only
the header's JSON is hostile: huge, negative, float, bool or string numbers, lone surrogates,
non-ASCII, NaN, Infinity, 1e400, oversized or badly named metrics, extra, missing, duplicate or
nested keys. The oracle below restates the rules independently of protocol/messages.py, and also
pushes each accepted update through what the gateway does with it (SQLite, float weights, JSON
with allow_nan=False), the places where such values crashed it before.
"""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
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
from protocol import codec, topics
from protocol.codec import DecodeError
from protocol.messages import GlobalModel, Status, TrainConfig, Update
from protocol.signing import (
    generate_signing_key,
    open_signed,
    public_key_bytes,
    registry_from_json,
    registry_to_json,
    sign_payload,
)
from tests.conftest import make_adapter
from tests.test_fuzz_codec import DEVICE, FED, MANIFEST, StubTransport
from tests.test_fuzz_codec import SHAPES as FUZZ_SHAPES

HOSTILE = settings(max_examples=400, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHAPES = {"fc1.lora_A.weight": (2, 8), "fc1.lora_B.weight": (4, 2), "head.bias": (3,)}
INT32_MAX = 2**31 - 1
KEY = generate_signing_key()
REGISTRY = registry_from_json(registry_to_json({"dev-1": public_key_bytes(KEY)}))


def _update(**overrides: Any) -> Update:
    fields: dict[str, Any] = dict(
        federation="fed", round=3, device_id="dev-1", manifest_sha256="ab" * 32,
        num_samples=640, update_id="dev-1-3-0123456789ab", adapter=make_adapter(1, SHAPES),
        metrics={"train_loss": 0.5, "train_accuracy": 0.75})
    fields.update(overrides)
    return Update(**fields)


VALID = {
    "fp32": codec.encode_update(_update()),
    "int8-topk": codec.encode_update(_update(is_delta=True), encoding="int8-channel", topk=0.5),
    "task": codec.encode_update(_update(task="t1", metrics={})),
}


# -- re-packing a header into a valid frame ----------------------------------------------------
def _split(payload: bytes) -> tuple[dict[str, str], dict[str, Any], dict[str, np.ndarray]]:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    (length,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    return metadata, json.loads(metadata["header"]), dict(safetensors.numpy.load(raw))


class Raw:
    """A JSON literal written as is (1e400, NaN, a duplicate key...), which json.dumps cannot."""

    def __init__(self, text: str) -> None:
        self.text = text


def _dumps(header: dict[str, Any]) -> str:
    literals: list[str] = []

    def placeholder(value: Any) -> Any:
        if isinstance(value, Raw):
            literals.append(value.text)
            return f"@@raw{len(literals) - 1}@@"
        if isinstance(value, dict):
            return {k: placeholder(v) for k, v in value.items()}
        if isinstance(value, list):
            return [placeholder(v) for v in value]
        return value

    text = json.dumps(placeholder(header))  # NaN and inf become NaN / Infinity, on purpose
    for i, literal in enumerate(literals):
        text = text.replace(f'"@@raw{i}@@"', literal)
    return text


def repack(payload: bytes, header: dict[str, Any] | str) -> bytes:
    """`payload` with its header replaced: valid safetensors in one checksummed zstd frame."""
    metadata, _, tensors = _split(payload)
    text = header if isinstance(header, str) else _dumps(header)
    body = safetensors.numpy.save(tensors, metadata={**metadata, "header": text})
    return zstandard.ZstdCompressor(write_checksum=True).compress(body)


def _header(name: str = "fp32") -> dict[str, Any]:
    return _split(VALID[name])[1]


# -- the oracle: the documented rules, restated --------------------------------------------
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
METRIC = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TASK = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")  # raises on a lone surrogate: that would be a rule violation


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def assert_documented(update: Update, header: Any) -> None:
    """Every field of a decoded update obeys PROTOCOL.md section 5, and survives the gateway."""
    for segment in (update.federation, update.device_id):
        assert isinstance(segment, str) and segment and 0 < len(_utf8(segment)) <= 255
        assert not set(segment) & set("/+#\0")
    assert _is_int(update.round, 0, INT32_MAX)
    assert _is_int(update.num_samples, 1, INT32_MAX)
    assert isinstance(update.update_id, str) and TOKEN.fullmatch(update.update_id)
    assert isinstance(update.manifest_sha256, str) and TOKEN.fullmatch(update.manifest_sha256)
    assert type(update.is_delta) is bool
    assert update.task == "" or (isinstance(update.task, str) and TASK.fullmatch(update.task))
    assert isinstance(update.metrics, dict) and len(update.metrics) <= 16
    for name, value in update.metrics.items():
        assert isinstance(name, str) and METRIC.fullmatch(name)
        assert type(value) is float and math.isfinite(value) and abs(value) <= 1e15
    for name, array in update.adapter.items():
        assert isinstance(name, str) and array.dtype == np.float32
    # What was decoded is what the header said (nothing coerced behind the sender's back).
    if isinstance(header, dict):
        assert (update.num_samples, update.round, update.update_id) == (
            header["num_samples"], header["round"], header["update_id"])
        assert update.metrics == header.get("metrics", {})
    # What the gateway does with an accepted update: the crashes of the past were here.
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE accepted (update_id TEXT PRIMARY KEY, round INTEGER, "
               "device_id TEXT, num_samples INTEGER, weight REAL, metrics TEXT)")
    db.execute("INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?)",
               (update.update_id, update.round, update.device_id, update.num_samples,
                float(min(update.num_samples, 100_000)),
                json.dumps({k: v * update.num_samples for k, v in update.metrics.items()},
                           allow_nan=False)))
    db.close()


def decode_is_safe(payload: bytes, header: Any = None) -> Update | None:
    """decode_update's answer: a documented Update, or None for a DecodeError (else: fail)."""
    try:
        update = codec.decode_update(payload)
    except DecodeError as exc:
        assert "\n" not in str(exc), "DecodeError messages are one line"
        str(exc).encode("utf-8")  # loggable
        return None
    assert_documented(update, header)
    return update


# -- strategies ------------------------------------------------------------------------------
SURROGATE = st.characters(categories=["Cs"])
NASTY_TEXT = st.one_of(
    st.text(max_size=80),  # any non-surrogate code point, "" included
    st.text(st.characters(codec="ascii"), max_size=80),
    st.lists(st.one_of(SURROGATE, st.characters()), min_size=1, max_size=8).map("".join),
    st.sampled_from(["\ud800", "a\udfff", "dev-1\ud83d", "caf\u00e9", "x" * 64, "x" * 65,
                     "a/b", "+", "#", "a\0b", "a b", "", "dev-1-3-x", "\u0661\u0662", "ok"]),
)
BIG_NUMBERS = st.one_of(
    st.integers(-2**80, 2**80),
    st.sampled_from([0, 1, -1, INT32_MAX, INT32_MAX + 1, 2**53, 2**63, 2**64, 2**70,
                     10**400, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("1E+999"), Raw("NaN"), Raw("Infinity"),
                     Raw("-Infinity"), Raw("5.0"), Raw("1e2"), Raw("-0"), Raw("0.0")]),
)
SCALARS = st.one_of(st.none(), st.booleans(), BIG_NUMBERS, NASTY_TEXT)
NESTED = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(NASTY_TEXT, children, max_size=3)),
    max_leaves=6)
METRIC_NAMES = st.one_of(NASTY_TEXT, st.from_regex(METRIC, fullmatch=True))
METRICS = st.one_of(
    st.dictionaries(METRIC_NAMES, st.one_of(BIG_NUMBERS, SCALARS), max_size=20),
    st.integers(0, 40).map(lambda n: {f"m{i}": float(i) for i in range(n)}),  # too many
    st.sampled_from([{"train_loss": Raw("1e400")}, {"train_loss": 10**400},
                     {"train_loss": float("nan")}, {"a": {"b": 1.0}}, [], "loss", 1.5]),
    NESTED,
)
FIELDS = ["federation", "round", "device_id", "manifest_sha256", "num_samples", "update_id",
          "metrics", "is_delta", "encoding", "topk", "task", "shapes"]
OPS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), NESTED),
    st.tuples(st.just("set"), st.sampled_from(["num_samples", "round"]), BIG_NUMBERS),
    st.tuples(st.just("set"), st.sampled_from(["update_id", "device_id", "federation",
                                               "manifest_sha256", "task"]), NASTY_TEXT),
    st.tuples(st.just("set"), st.just("metrics"), METRICS),
    st.tuples(st.just("delete"), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("extra"), NASTY_TEXT, NESTED),
)


def _apply(header: dict[str, Any], ops: list[tuple[str, str, Any]]) -> dict[str, Any]:
    header = dict(header)
    for op, field, value in ops:
        if op in ("set", "extra"):
            header[field] = value
        else:
            header.pop(field, None)
    return header


def _plain(header: dict[str, Any]) -> Any:
    """The header as the decoder will see it, when it is plain JSON (else None: no comparison)."""
    try:
        return json.loads(_dumps(header), parse_constant=lambda _: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return None


# -- properties ------------------------------------------------------------------------------
@HOSTILE
@given(base=st.sampled_from(sorted(VALID)), ops=st.lists(OPS, min_size=1, max_size=4))
def test_hostile_update_headers_decode_to_documented_updates_or_decode_error(
        base: str, ops: list[tuple[str, str, Any]]) -> None:
    header = _apply(_header(base), ops)
    decode_is_safe(repack(VALID[base], header), _plain(header))


@HOSTILE
@given(base=st.sampled_from(sorted(VALID)), ops=st.lists(OPS, min_size=1, max_size=3),
       duplicate=st.sampled_from(FIELDS), value=st.one_of(BIG_NUMBERS, NASTY_TEXT))
def test_duplicate_keys_are_always_refused(base: str, ops: list[tuple[str, str, Any]],
                                           duplicate: str, value: Any) -> None:
    header = _apply(_header(base), ops)
    text = _dumps(header)
    extra = _dumps({duplicate: value})[1:-1]
    text = text[:-1] + (", " if header else "") + extra + "}"
    if duplicate in header:
        with pytest.raises(DecodeError):
            codec.decode_update(repack(VALID[base], text))
    else:
        decode_is_safe(repack(VALID[base], text))


@HOSTILE
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["federation", "round", "manifest_sha256",
                                               "local_steps", "learning_rate", "final",
                                               "update_encoding", "update_topk", "assignment",
                                               "task_index", "task_classes"]), NESTED),
    st.tuples(st.just("set"), st.sampled_from(["round", "local_steps", "task_index"]),
              BIG_NUMBERS),
    st.tuples(st.just("delete"), st.sampled_from(["federation", "round", "final"]), st.none()),
    st.tuples(st.just("extra"), NASTY_TEXT, NESTED),
), min_size=1, max_size=3))
def test_hostile_global_headers_decode_to_valid_globals_or_decode_error(
        ops: list[tuple[str, str, Any]]) -> None:
    payload = codec.encode_global(GlobalModel("fed", 2, "ab" * 32, make_adapter(2, SHAPES),
                                              TrainConfig(5, 0.1)))
    try:
        message = codec.decode_global(repack(payload, _apply(_split(payload)[1], ops)))
    except DecodeError:
        return
    assert _is_int(message.round, 0, INT32_MAX) and TOKEN.fullmatch(message.manifest_sha256)
    assert _is_int(message.train.local_steps, 1, INT32_MAX)
    assert math.isfinite(message.train.learning_rate) and message.train.learning_rate > 0
    _utf8(message.federation)
    for slot, cluster in message.assignment.items():
        _utf8(slot)
        assert _is_int(cluster, 0, len(message.clusters) - 1)


@HOSTILE
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["schema", "device_id", "online", "problem"]),
              NESTED),
    st.tuples(st.just("set"), st.just("problem"), st.sampled_from(["manifest", "", "MANIFEST"])),
    st.tuples(st.just("delete"), st.sampled_from(["schema", "device_id", "online"]), st.none()),
    st.tuples(st.just("extra"), NASTY_TEXT, NESTED),
), min_size=1, max_size=3))
def test_hostile_status_messages_decode_to_valid_statuses_or_decode_error(
        ops: list[tuple[str, str, Any]]) -> None:
    fields = _apply({"schema": 1, "device_id": "dev-1", "online": True}, ops)
    try:
        status = codec.decode_status(_dumps(fields).encode("utf-8", "surrogatepass"))
    except DecodeError:
        return
    assert isinstance(status, Status) and type(status.online) is bool
    assert status.problem in (None, "manifest")
    assert 0 < len(_utf8(status.device_id)) <= 255 and not set(status.device_id) & set("/+#\0")


# -- the crash inputs found by review, as regressions ----------------------------------------
CRASHES = {
    "update_id lone surrogate": {"update_id": "\ud800"},  # UnicodeEncodeError in SQLite
    "num_samples 2^70": {"num_samples": 2**70},  # OverflowError in SQLite
    "num_samples 10^400": {"num_samples": 10**400},  # OverflowError in float()
    "metric 10^400": {"metrics": {"train_loss": 10**400}},  # OverflowError in decode_update
    "metric 1e400": {"metrics": {"train_loss": Raw("1e400")}},  # json parses it to inf
    "metric NaN": {"metrics": {"train_loss": float("nan")}},
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_crash_inputs_are_decode_errors_even_when_signed(name: str) -> None:
    payload = repack(VALID["fp32"], _header() | CRASHES[name])
    with pytest.raises(DecodeError):
        codec.decode_update(payload)
    # Correctly signed by the device it names: the signature passes, the payload still fails.
    opened = open_signed(REGISTRY, "dev-1", sign_payload(KEY, "dev-1", payload))
    assert opened == payload
    with pytest.raises(DecodeError):
        codec.decode_update(opened)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Coordinator]:
    with tempfile.TemporaryDirectory(prefix="edgefl-hostile-") as folder:
        config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=2, min_clients=1)
        yield Coordinator(config, MANIFEST, make_adapter(0, FUZZ_SHAPES), StubTransport(),
                          GlobalStore(Path(folder)))


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_crash_inputs_are_rejected_as_malformed_by_the_gateway(coordinator: Coordinator,
                                                               name: str) -> None:
    base = codec.encode_update(_update(federation=FED, device_id=DEVICE, round=0,
                                       manifest_sha256=MANIFEST.sha256,
                                       adapter=make_adapter(1, FUZZ_SHAPES)))
    topic = topics.update_topic(FED, DEVICE)
    assert coordinator.validate(topic, base).device_id == DEVICE  # the control
    with pytest.raises(Rejected) as info:
        coordinator.validate(topic, repack(base, _split(base)[1] | CRASHES[name]))
    assert info.value.reason == "malformed"


def test_control_the_repacked_valid_header_still_decodes() -> None:
    for name, payload in VALID.items():
        header = _header(name)
        update = decode_is_safe(repack(payload, header), header)
        assert update is not None, name


# -- integrity: bit flips ------------------------------------------------------------------
def _content(payload: bytes) -> bytes | None:
    """The frame's decompressed content, or None where zstd itself refuses the frame."""
    try:
        if zstandard.frame_content_size(payload) > codec.MAX_DECOMPRESSED_BYTES:
            return None
        return zstandard.ZstdDecompressor().decompress(
            payload, max_output_size=codec.MAX_DECOMPRESSED_BYTES, allow_extra_data=False)
    except zstandard.ZstdError:
        return None


@pytest.mark.parametrize("name", sorted(VALID))
def test_thirty_bit_flips_in_the_compressed_body_are_all_rejected(name: str) -> None:
    # zstd ignores a few bits of a frame (about 0.5% here: padding in its bit streams), so a
    # flip there changes no decompressed byte: the same message, which is no corruption. Every
    # other flip must be rejected; before the checksum, 22 of 30 decoded as (other) updates.
    payload = VALID[name]
    original = _content(payload)
    body_start = zstandard.frame_header_size(payload)
    rng = random.Random(f"bit-flips-{name}")
    outcomes = []
    for _ in range(30):
        flipped = bytearray(payload)
        at, bit = rng.randrange(body_start, len(payload)), rng.randrange(8)
        flipped[at] ^= 1 << bit
        try:
            codec.decode_update(bytes(flipped))
        except DecodeError:
            outcomes.append("rejected")
            continue
        assert _content(bytes(flipped)) == original, f"byte {at} bit {bit} changed the update"
        outcomes.append("no-op")
    assert outcomes.count("rejected") + outcomes.count("no-op") == 30
    assert outcomes.count("rejected") >= 27, outcomes  # no-op bits are rare


def test_every_single_bit_flip_is_rejected_or_changes_nothing() -> None:
    # Anywhere in the payload, frame header included: a flip the checksum cannot see (the
    # header's unused bit, say) must decode to exactly the same message.
    payload = VALID["int8-topk"]
    original = codec.decode_update(payload)
    for at in range(len(payload)):
        for bit in range(8):
            flipped = bytearray(payload)
            flipped[at] ^= 1 << bit
            try:
                update = codec.decode_update(bytes(flipped))
            except DecodeError:
                continue
            assert _content(bytes(flipped)) == _content(payload), (at, bit)
            assert (update.update_id, update.num_samples, update.metrics) == (
                original.update_id, original.num_samples, original.metrics), (at, bit)
            for key, value in original.adapter.items():
                np.testing.assert_array_equal(update.adapter[key], value)


def test_unchecksummed_second_frame_and_trailing_bytes_are_rejected() -> None:
    payload = VALID["fp32"]
    raw = zstandard.ZstdDecompressor().decompress(payload)
    for bad in (zstandard.ZstdCompressor(write_checksum=False).compress(raw), payload + b"\0",
                payload + VALID["task"], payload[:-1]):
        with pytest.raises(DecodeError):
            codec.decode_update(bad)
