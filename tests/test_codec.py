"""Codec round trips and rejections of malformed, foreign, oversized and wrongly typed payloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
import zstandard

from protocol import codec
from protocol.codec import DecodeError
from protocol.messages import GlobalModel, Status, TrainConfig, Update
from tests.conftest import make_adapter

SHAPES = {"fc1.lora_A.weight": (4, 16), "fc1.lora_B.weight": (8, 4), "head.bias": (3,)}


def _frame(raw: bytes) -> bytes:
    """A zstd frame as the protocol requires it: with its content checksum."""
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw)


def _update(**overrides: object) -> Update:
    fields: dict[str, object] = dict(
        federation="fed", round=3, device_id="dev-1", manifest_sha256="ab" * 32,
        num_samples=640, update_id="dev-1-3-x", adapter=make_adapter(1, SHAPES),
        metrics={"train_loss": 0.5},
    )
    fields.update(overrides)
    return Update(**fields)  # type: ignore[arg-type]


def test_update_round_trip_keeps_every_field_and_tensor() -> None:
    original = _update()
    decoded = codec.decode_update(codec.encode_update(original))
    assert (decoded.federation, decoded.round, decoded.device_id) == ("fed", 3, "dev-1")
    assert (decoded.num_samples, decoded.update_id, decoded.metrics) == (
        640, "dev-1-3-x", {"train_loss": 0.5})
    assert decoded.manifest_sha256 == original.manifest_sha256
    assert set(decoded.adapter) == set(SHAPES)
    for name, array in original.adapter.items():
        np.testing.assert_array_equal(decoded.adapter[name], array)
        assert decoded.adapter[name].dtype == np.float32


def test_global_round_trip_keeps_train_config_and_final_flag() -> None:
    train = TrainConfig(local_steps=9, learning_rate=0.01, update_encoding="int8-channel",
                        update_topk=0.25)
    original = GlobalModel("fed", 7, "cd" * 32, make_adapter(2, SHAPES), train, final=True)
    decoded = codec.decode_global(codec.encode_global(original))
    assert decoded.round == 7 and decoded.final is True
    assert decoded.train == TrainConfig(9, 0.01, "int8-channel", 0.25)
    np.testing.assert_array_equal(decoded.adapter["head.bias"], original.adapter["head.bias"])


def test_payload_is_compressed_zstd_frame() -> None:
    payload = codec.encode_update(_update(adapter={"z": np.zeros((256, 256), np.float32)}))
    assert payload[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic number
    assert len(payload) < 256 * 256 * 4 / 10


@pytest.mark.parametrize("payload", [b"", b"not zstd at all", b"\x28\xb5\x2f\xfd garbage"])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode_update(payload)


def test_zstd_of_garbage_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="safetensors|header"):
        codec.decode_update(_frame(b"\xff" * 100))


def test_every_frame_carries_a_content_checksum() -> None:
    update = codec.encode_update(_update())
    plain = codec.encode_global(GlobalModel("f", 0, "h", make_adapter(0, SHAPES)))
    for payload in (update, plain):
        assert zstandard.get_frame_parameters(payload).has_checksum


def test_frame_without_checksum_is_rejected() -> None:
    raw = zstandard.ZstdDecompressor().decompress(codec.encode_update(_update()))
    with pytest.raises(DecodeError, match="checksum"):
        codec.decode_update(zstandard.ZstdCompressor().compress(raw))


def test_trailing_bytes_and_second_frames_are_rejected() -> None:
    payload = codec.encode_update(_update())
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    for bad in (payload + b"\0", payload + payload, payload + skippable):
        with pytest.raises(DecodeError, match="unused data"):
            codec.decode_update(bad)
    assert codec.decode_update(payload).update_id == "dev-1-3-x"  # the control


def test_flipped_byte_in_the_compressed_body_fails_the_checksum() -> None:
    payload = codec.encode_update(_update())
    start = zstandard.frame_header_size(payload)
    flipped = bytearray(payload)
    flipped[len(payload) - 1] ^= 0x01  # the last byte: part of the checksum itself
    with pytest.raises(DecodeError):
        codec.decode_update(bytes(flipped))
    for at in range(start, len(payload), max(1, (len(payload) - start) // 40)):
        flipped = bytearray(payload)
        flipped[at] ^= 0x10
        with pytest.raises(DecodeError):
            codec.decode_update(bytes(flipped))


def _raw(metadata: dict[str, str]) -> bytes:
    body = safetensors.numpy.save({"x": np.ones(2, np.float32)}, metadata=metadata)
    return _frame(body)


def test_other_schema_version_is_rejected() -> None:
    header = json.dumps({"federation": "f"})
    with pytest.raises(DecodeError, match="schema version"):
        codec.decode_update(_raw({"schema": "2", "kind": "update", "header": header}))


def test_global_message_is_not_accepted_as_update() -> None:
    payload = codec.encode_global(GlobalModel("f", 0, "h", make_adapter(0, SHAPES)))
    with pytest.raises(DecodeError, match="expected a 'update'"):
        codec.decode_update(payload)


def _valid_header(**overrides: object) -> dict[str, object]:
    header: dict[str, object] = {
        "federation": "f", "round": 1, "device_id": "d", "manifest_sha256": "h",
        "num_samples": 5, "update_id": "u", "metrics": {}, "is_delta": False,
        "encoding": "fp32", "topk": None}
    header.update(overrides)
    return header


def test_minimal_valid_header_decodes() -> None:
    # The control for the rejection table below: only the overridden field is wrong there.
    update = codec.decode_update(
        _raw({"schema": "1", "kind": "update", "header": json.dumps(_valid_header())}))
    assert (update.device_id, update.is_delta) == ("d", False)
    np.testing.assert_array_equal(update.adapter["x"], np.ones(2, np.float32))


@pytest.mark.parametrize(("field", "value"), [
    ("round", "3"), ("round", True), ("num_samples", 1.5), ("device_id", 7),
    ("metrics", {"loss": "high"}), ("num_samples", 0), ("is_delta", "yes"), ("is_delta", None),
    ("encoding", "fp8"), ("encoding", 32), ("encoding", None), ("topk", 0), ("topk", 1.5),
    ("topk", "0.1"), ("topk", True), ("shapes", {"x": [2]}),
    # ranges and token grammars of PROTOCOL.md section 5
    ("num_samples", 2**31), ("num_samples", -1), ("num_samples", 10**400), ("round", -1),
    ("round", 2**31), ("update_id", ""), ("update_id", "a b"), ("update_id", "x" * 65),
    ("update_id", "caf\u00e9"), ("update_id", "\ud800"), ("device_id", "a/b"),
    ("device_id", ""), ("device_id", "d" * 256), ("federation", "f+"), ("manifest_sha256", ""),
    ("metrics", {"loss": 1e300 * 1e300}), ("metrics", {"bad name": 1.0}),
    ("metrics", {f"m{i}": 1.0 for i in range(17)}), ("metrics", {"loss": 10**400}),
    ("metrics", {"loss": 2e15}), ("metrics", [1.0]), ("task", ""), ("task", None),
    ("extra", 1), ("round", {"n": 1}),
])
def test_wrongly_typed_header_fields_are_rejected(field: str, value: object) -> None:
    header = _valid_header(**{field: value})
    with pytest.raises(DecodeError):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": json.dumps(header)}))


@pytest.mark.parametrize("field", ["encoding", "topk", "is_delta", "federation", "round",
                                   "device_id", "manifest_sha256", "num_samples", "update_id"])
def test_missing_header_fields_are_rejected(field: str) -> None:
    header = _valid_header()
    del header[field]
    with pytest.raises(DecodeError, match=field):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": json.dumps(header)}))


def test_header_rules_accept_their_boundaries() -> None:
    header = _valid_header(num_samples=2**31 - 1, round=2**31 - 1, update_id="a" * 64,
                           device_id="\u00e9" * 127, metrics={f"m.{i}": -1e15 for i in range(16)})
    update = codec.decode_update(
        _raw({"schema": "1", "kind": "update", "header": json.dumps(header)}))
    assert (update.num_samples, update.round, len(update.metrics)) == (2**31 - 1,) * 2 + (16,)
    assert update.metrics["m.0"] == -1e15 and update.task == ""


@pytest.mark.parametrize("text", [
    '{"round": 1, "round": 2}',  # duplicate key
    '{"x": NaN}', '{"x": Infinity}', '{"x": -Infinity}', '{"x": 1e400}',
    '{"x": "\\ud800"}', '{"\\udfff": 1}',  # lone surrogates, as escapes
])
def test_strict_json_refuses_what_the_protocol_forbids(text: str) -> None:
    with pytest.raises(DecodeError):
        codec.strict_json(text, "header")


def test_header_with_duplicate_keys_is_rejected() -> None:
    text = json.dumps(_valid_header())[:-1] + ', "num_samples": 6}'
    with pytest.raises(DecodeError, match="duplicate key"):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": text}))


def test_unknown_metadata_key_is_rejected() -> None:
    header = json.dumps(_valid_header())
    with pytest.raises(DecodeError, match="metadata"):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": header, "x": "1"}))


@pytest.mark.parametrize("payload", [
    b'{"schema": 1, "device_id": "d", "online": true, "extra": 1}',
    b'{"schema": 1, "device_id": "d"}',
    b'{"schema": true, "device_id": "d", "online": true}',
    b'{"schema": 2, "device_id": "d", "online": true}',
    b'{"schema": 1, "device_id": "d", "online": 1}',
    b'{"schema": 1, "device_id": "a/b", "online": true}',
    b'{"schema": 1, "device_id": "\\ud800", "online": true}',
    b'{"schema": 1, "device_id": "d", "online": true, "problem": null}',
    b'{"schema": 1, "device_id": "d", "online": true, "problem": "hungry"}',
    b'{"schema": 1, "device_id": "d", "online": true, "online": false}',
    b'[1]', b'\xff', b" " * 5000,
])
def test_malformed_status_is_rejected(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode_status(payload)


@pytest.mark.parametrize(("field", "value"), [
    ("round", -1), ("round", 2**31), ("local_steps", 0), ("local_steps", 2**31),
    ("learning_rate", 10**400), ("learning_rate", 0), ("final", 1), ("federation", "a/b"),
    ("manifest_sha256", "\ud800"), ("extra", None), ("task_index", 0),
])
def test_global_header_rules(field: str, value: object) -> None:
    payload = codec.encode_global(GlobalModel("f", 0, "h", make_adapter(0, SHAPES)))
    metadata = _metadata(payload)
    header = json.loads(metadata["header"])
    header[field] = value
    metadata["header"] = json.dumps(header)
    tensors = safetensors.numpy.load(zstandard.ZstdDecompressor().decompress(payload))
    with pytest.raises(DecodeError):
        codec.decode_global(_frame(safetensors.numpy.save(tensors, metadata=metadata)))


def test_oversized_payload_is_rejected_before_decompression() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        codec.decode_update(b"\0" * (codec.MAX_PAYLOAD_BYTES + 1))


def test_decompression_bomb_is_rejected() -> None:
    bomb = _frame(b"\0" * (codec.MAX_DECOMPRESSED_BYTES + 1))
    assert len(bomb) < codec.MAX_PAYLOAD_BYTES
    with pytest.raises(DecodeError, match="decompressed"):
        codec.decode_update(bomb)


def test_status_round_trip() -> None:
    assert codec.decode_status(codec.encode_status(True, "dev-9")) == Status("dev-9", True, None)
    assert codec.decode_status(codec.encode_status(False, "dev-9", "manifest")) == Status(
        "dev-9", False, "manifest")
    assert b"problem" not in codec.encode_status(True, "dev-9")  # absent unless set
    with pytest.raises(DecodeError):
        codec.decode_status(b"{}")
    with pytest.raises(ValueError, match="problem"):
        codec.encode_status(True, "dev-9", "hungry")


# -- compact encodings --------------------------------------------------------------------

ENCODED_SHAPES = {"fc1.lora_A.weight": (4, 64), "fc1.lora_B.weight": (32, 4), "head.bias": (10,)}


def _metadata(payload: bytes) -> dict[str, str]:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    (length,) = np.frombuffer(raw[:8], "<u8")
    return json.loads(raw[8 : 8 + int(length)])["__metadata__"]


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int8-channel"])
@pytest.mark.parametrize("topk", [None, 0.1])
def test_update_round_trip_restores_dense_float32_per_encoding(
    encoding: str, topk: float | None
) -> None:
    original = _update(adapter=make_adapter(5, ENCODED_SHAPES), is_delta=True)
    payload = codec.encode_update(original, encoding=encoding, topk=topk)
    decoded = codec.decode_update(payload)
    assert decoded.is_delta is True and decoded.update_id == original.update_id
    for name, x in original.adapter.items():
        y = decoded.adapter[name]
        assert y.dtype == np.float32 and y.shape == x.shape
        kept = y != 0
        if topk is not None:  # about a tenth of each tensor survives, the rest is exactly 0
            assert kept.sum() == int(np.ceil(topk * x.size))
        # Loose bound covering every encoding; test_quant checks each one's exact bound.
        np.testing.assert_allclose(y[kept], x[kept], atol=np.abs(x).max() / 127)
    header = json.loads(_metadata(payload)["header"])
    assert (header["encoding"], header["topk"], header["is_delta"]) == (encoding, topk, True)
    assert ("shapes" in header) == (topk is not None)
    if topk is not None:
        assert header["shapes"] == {k: list(v) for k, v in ENCODED_SHAPES.items()}


def test_int8_update_is_smaller_than_fp16_smaller_than_fp32() -> None:
    update = _update(adapter=make_adapter(6, ENCODED_SHAPES))
    sizes = [len(codec.encode_update(update, encoding=e)) for e in ("int8", "fp16", "fp32")]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize(("encoding", "topk", "match"), [
    ("int4", None, "valid encodings are .*'int8-channel'"),
    ("fp16", 0.0, "topk"),
    ("fp16", 2, "topk"),
])
def test_encode_update_rejects_bad_encoding_or_topk(
    encoding: str, topk: float | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        codec.encode_update(_update(), encoding=encoding, topk=topk)


def _raw_update(tensors: dict[str, np.ndarray], **header: object) -> bytes:
    body = safetensors.numpy.save(tensors, metadata={
        "schema": "1", "kind": "update", "header": json.dumps(_valid_header(**header))})
    return _frame(body)


I32, I8, F32 = np.int32, np.int8, np.float32
SPARSE = {"x": [2, 3]}


@pytest.mark.parametrize(("tensors", "header", "match"), [
    # dense int8: missing scale, extra tensor, wrong scale shape, wrong value dtype, bad scale
    ({"x": np.ones(4, I8)}, {"encoding": "int8"}, "missing"),
    ({"x": np.ones(4, I8), "x#scale": np.ones(1, F32), "x#bias": np.ones(1, F32)},
     {"encoding": "int8"}, "unexpected"),
    ({"x": np.ones((2, 3), I8), "x#scale": np.ones(3, F32)}, {"encoding": "int8-channel"},
     "shape"),
    ({"x": np.ones(4, F32), "x#scale": np.ones(1, F32)}, {"encoding": "int8"}, "dtype"),
    ({"x": np.ones(4, I8), "x#scale": np.array([-1], F32)}, {"encoding": "int8"}, "non-negative"),
    ({"x": np.ones(4, I8), "x#scale": np.array([np.inf], F32)}, {"encoding": "int8"}, "finite"),
    ({"x": np.ones(4, np.float64)}, {"encoding": "fp32"}, "dtype"),
    ({"x": np.ones(4, F32)}, {"encoding": "fp16"}, "dtype"),
    # top-k: inconsistent index/value lengths, out of range, unordered, shapes disagreeing
    ({"x#indices": np.array([0, 1], I32), "x#values": np.ones(3, F32)},
     {"topk": 0.5, "shapes": SPARSE}, "same length"),
    ({"x#indices": np.array([0, 6], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": SPARSE}, "out of range"),
    ({"x#indices": np.array([-1, 2], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": SPARSE}, "out of range"),
    ({"x#indices": np.array([3, 3], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": SPARSE}, "increasing"),
    ({"x#indices": np.array([0, 1], np.int64), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": SPARSE}, "dtype"),
    ({"x#indices": np.array([0, 1], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": {"y": [2, 3]}}, "missing"),
    ({"x#indices": np.array([0, 1], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5}, "shapes"),
    ({"x#indices": np.array([0, 1], I32), "x#values": np.ones(2, F32)},
     {"topk": 0.5, "shapes": {"x": [2, -3]}}, "shapes"),
    ({"x#indices": np.array([0, 4], I32), "x#values": np.ones(2, I8),
      "x#scale": np.ones(3, F32)}, {"topk": 0.5, "shapes": SPARSE, "encoding": "int8-channel"},
     "shape"),
    ({"x#indices": np.array([0, 4], I32), "x#values": np.ones(2, I8)},
     {"topk": 0.5, "shapes": SPARSE, "encoding": "int8"}, "missing"),
    # a few bytes of indices must not make the gateway allocate a huge dense tensor
    ({"x#indices": np.array([0], I32), "x#values": np.ones(1, F32)},
     {"topk": 0.5, "shapes": {"x": [2**20, 2**20]}}, "bytes"),
])
def test_inconsistent_wire_tensors_are_decode_errors(
    tensors: dict[str, np.ndarray], header: dict[str, object], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        codec.decode_update(_raw_update(tensors, **header))


def test_handmade_sparse_int8_channel_update_decodes() -> None:
    # The control for the table above: a well-formed top-k payload built without the encoder.
    payload = _raw_update(
        {"x#indices": np.array([1, 5], I32), "x#values": np.array([-127, 64], I8),
         "x#scale": np.array([0.5, 0.25], F32)},
        encoding="int8-channel", topk=0.5, shapes=SPARSE)
    expected = np.array([[0, -63.5, 0], [0, 0, 16]], np.float32)
    np.testing.assert_array_equal(codec.decode_update(payload).adapter["x"], expected)


@pytest.mark.parametrize(("field", "value"), [
    ("update_encoding", "bf16"), ("update_encoding", None), ("update_topk", 0),
    ("update_topk", "all"), ("learning_rate", "fast"),
])
def test_global_with_bad_update_settings_is_rejected(field: str, value: object) -> None:
    payload = codec.encode_global(GlobalModel("f", 0, "h", make_adapter(0, SHAPES)))
    raw = zstandard.ZstdDecompressor().decompress(payload)
    tensors = safetensors.numpy.load(raw)
    metadata = _metadata(payload)
    header = json.loads(metadata["header"])
    header[field] = value
    metadata["header"] = json.dumps(header)
    bad = _frame(safetensors.numpy.save(tensors, metadata=metadata))
    with pytest.raises(DecodeError):
        codec.decode_global(bad)
    assert codec.decode_global(payload).train == TrainConfig()  # the unmodified one is fine


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"update_encoding": "int4"}, "valid encodings"),
    ({"update_topk": 0.0}, "topk"),
    ({"update_topk": 1.01}, "topk"),
])
def test_train_config_validates_update_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_update_task_slot_round_trips_and_is_absent_by_default() -> None:
    decoded = codec.decode_update(codec.encode_update(_update(task="t1")))
    assert decoded.task == "t1"
    assert "task" not in json.loads(_metadata(codec.encode_update(_update()))["header"])
    assert codec.decode_update(codec.encode_update(_update())).task == ""
    with pytest.raises(ValueError, match="task slot"):
        _update(task="a/b")  # "/" joins slot names to device ids


def test_update_with_a_bad_task_slot_is_a_decode_error() -> None:
    payload = codec.encode_update(_update(task="t1"))
    metadata = _metadata(payload)
    header = json.loads(metadata["header"])
    tensors = safetensors.numpy.load(zstandard.ZstdDecompressor().decompress(payload))
    for bad in ("x" * 33, "a/b", 3):
        header["task"] = bad
        metadata["header"] = json.dumps(header)
        forged = _frame(
            safetensors.numpy.save(tensors, metadata=metadata))
        with pytest.raises(DecodeError):
            codec.decode_update(forged)


def test_global_round_trip_keeps_clusters_assignment_and_task() -> None:
    clusters = (make_adapter(3, SHAPES), make_adapter(4, SHAPES))
    original = GlobalModel("fed", 2, "cd" * 32, make_adapter(2, SHAPES), clusters=clusters,
                           assignment={"dev-1/t0": 1, "dev-2": 0}, task_index=1,
                           task_classes=(2, 3))
    decoded = codec.decode_global(codec.encode_global(original))
    assert decoded.assignment == {"dev-1/t0": 1, "dev-2": 0}
    assert (decoded.task_index, decoded.task_classes) == (1, (2, 3))
    assert set(decoded.adapter) == set(SHAPES) and len(decoded.clusters) == 2
    for got, want in zip(decoded.clusters, clusters, strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(decoded.start_adapter("dev-1", "t0")["head.bias"],
                                  clusters[1]["head.bias"])
    np.testing.assert_array_equal(decoded.start_adapter("dev-3")["head.bias"],
                                  original.adapter["head.bias"])  # unassigned: the global


@pytest.mark.parametrize(("field", "value"), [
    ("assignment", {"dev-1": 5}),  # no cluster 5
    ("assignment", {"dev-1": "0"}),
    ("assignment", [1]),
    ("task_classes", []),
    ("task_classes", ["2"]),
    ("task_index", None),
])
def test_global_with_bad_cluster_or_task_fields_is_rejected(field: str, value: object) -> None:
    payload = codec.encode_global(GlobalModel(
        "f", 0, "h", make_adapter(0, SHAPES), clusters=(make_adapter(1, SHAPES),),
        assignment={"dev-1": 0}, task_index=0, task_classes=(0, 1)))
    metadata = _metadata(payload)
    header = json.loads(metadata["header"])
    header[field] = value
    metadata["header"] = json.dumps(header)
    tensors = safetensors.numpy.load(zstandard.ZstdDecompressor().decompress(payload))
    bad = _frame(safetensors.numpy.save(tensors, metadata=metadata))
    with pytest.raises(DecodeError):
        codec.decode_global(bad)
    assert codec.decode_global(payload).assignment == {"dev-1": 0}
