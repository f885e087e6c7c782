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
    original = GlobalModel("fed", 7, "cd" * 32, make_adapter(2, SHAPES),
                           TrainConfig(local_steps=9, learning_rate=0.01), final=True)
    decoded = codec.decode_global(codec.encode_global(original))
    assert decoded.round == 7 and decoded.final is True
    assert decoded.train == TrainConfig(9, 0.01)
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


@pytest.mark.parametrize(("field", "value"), [
    ("round", "3"), ("round", True), ("num_samples", 1.5), ("device_id", 7),
    ("metrics", {"loss": "high"}), ("num_samples", 0),
])
def test_wrongly_typed_header_fields_are_rejected(field: str, value: object) -> None:
    header = {"federation": "f", "round": 1, "device_id": "d", "manifest_sha256": "h",
              "num_samples": 5, "update_id": "u", "metrics": {}}
    header[field] = value
    with pytest.raises(DecodeError):
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
