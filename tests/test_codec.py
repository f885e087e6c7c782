"""Codec round trips and rejections of malformed, foreign, oversized and wrongly typed payloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
import zstandard

from protocol import codec
from protocol.codec import DecodeError
from protocol.messages import GlobalModel, TrainConfig, Update
from tests.conftest import make_adapter

SHAPES = {"fc1.lora_A.weight": (4, 16), "fc1.lora_B.weight": (8, 4), "head.bias": (3,)}


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
        codec.decode_update(zstandard.ZstdCompressor().compress(b"\xff" * 100))


def _raw(metadata: dict[str, str]) -> bytes:
    body = safetensors.numpy.save({"x": np.ones(2, np.float32)}, metadata=metadata)
    return zstandard.ZstdCompressor().compress(body)


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
])
def test_wrongly_typed_header_fields_are_rejected(field: str, value: object) -> None:
    header = _valid_header(**{field: value})
    with pytest.raises(DecodeError):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": json.dumps(header)}))


@pytest.mark.parametrize("field", ["encoding", "topk", "is_delta"])
def test_missing_header_fields_are_rejected(field: str) -> None:
    header = _valid_header()
    del header[field]
    with pytest.raises(DecodeError, match=field):
        codec.decode_update(_raw({"schema": "1", "kind": "update", "header": json.dumps(header)}))


def test_oversized_payload_is_rejected_before_decompression() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        codec.decode_update(b"\0" * (codec.MAX_PAYLOAD_BYTES + 1))


def test_decompression_bomb_is_rejected() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (codec.MAX_DECOMPRESSED_BYTES + 1))
    assert len(bomb) < codec.MAX_PAYLOAD_BYTES
    with pytest.raises(DecodeError, match="decompressed"):
        codec.decode_update(bomb)


def test_status_round_trip() -> None:
    assert codec.decode_status(codec.encode_status(True, "dev-9")) == ("dev-9", True)
    with pytest.raises(DecodeError):
        codec.decode_status(b"{}")


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
    return zstandard.ZstdCompressor().compress(body)


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
    bad = zstandard.ZstdCompressor().compress(safetensors.numpy.save(tensors, metadata=metadata))
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
        forged = zstandard.ZstdCompressor().compress(
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
    bad = zstandard.ZstdCompressor().compress(safetensors.numpy.save(tensors, metadata=metadata))
    with pytest.raises(DecodeError):
        codec.decode_global(bad)
    assert codec.decode_global(payload).assignment == {"dev-1": 0}
