"""Pinned wire-format vectors: every committed payload decodes to exactly its committed JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zstandard

from protocol import codec
from protocol.messages import GlobalModel, Status, TrainConfig, Update
from tests.vectors.generate import VECTOR_DIR, WIRE_KEYS, build_vectors, describe, to_json

NAMES = sorted(path.stem for path in VECTOR_DIR.glob("*.json"))
UPDATES = [n for n in NAMES if n.startswith("update-")]
STATUSES = [n for n in NAMES if n.startswith("status-")]


def _load(name: str) -> tuple[bytes, dict[str, Any]]:
    expected = json.loads((VECTOR_DIR / f"{name}.json").read_text())
    return (VECTOR_DIR / expected["file"]).read_bytes(), expected


def _assert_tensors_equal(decoded: dict[str, np.ndarray], expected: dict[str, Any]) -> None:
    assert sorted(decoded) == sorted(expected)
    for name, values in expected.items():
        want = np.array(values, dtype=np.float32)  # JSON holds the float32 values exactly
        assert decoded[name].dtype == np.float32
        np.testing.assert_array_equal(decoded[name], want, err_msg=name)


def test_vector_set_is_complete() -> None:
    # One update per encoding, top-k combined with two of them, a task slot's update, a plain
    # global, one with every optional field (FL-TAC clusters, task schedule), the offline
    # status (the will) and an online status reporting a problem.
    assert set(NAMES) == {
        "update-fp32", "update-fp16", "update-int8", "update-int8-channel",
        "update-fp32-topk", "update-int8-channel-topk", "update-fp32-task", "global",
        "global-fltac", "status-offline", "status-manifest",
    }
    encodings = {json.loads((VECTOR_DIR / f"{n}.json").read_text())["header"]["encoding"]
                 for n in UPDATES}
    assert encodings == {"fp32", "fp16", "int8", "int8-channel"}


@pytest.mark.parametrize("name", UPDATES)
def test_update_vector_decodes_to_its_json(name: str) -> None:
    payload, expected = _load(name)
    header = expected["header"]
    update = codec.decode_update(payload)
    assert (update.federation, update.round, update.device_id) == (
        header["federation"], header["round"], header["device_id"])
    assert (update.manifest_sha256, update.num_samples, update.update_id) == (
        header["manifest_sha256"], header["num_samples"], header["update_id"])
    assert (update.metrics, update.is_delta) == (header["metrics"], header["is_delta"])
    assert update.task == header.get("task", "")
    _assert_tensors_equal(update.adapter, expected["tensors"])


@pytest.mark.parametrize("name", [*UPDATES, "global", "global-fltac"])
def test_vector_body_matches_its_wire_description(name: str) -> None:
    # What a Kotlin or Swift decoder sees after zstd and safetensors, before any dequantising.
    payload, expected = _load(name)
    assert payload[:4] == b"\x28\xb5\x2f\xfd"
    assert describe(payload) == {k: expected[k] for k in WIRE_KEYS}
    assert expected["frame"] == {"checksum": True}  # every frame carries the content checksum


@pytest.mark.parametrize("name", [*UPDATES, "global", "global-fltac"])
def test_vector_with_a_trailing_byte_or_without_checksum_is_rejected(name: str) -> None:
    payload, _ = _load(name)
    decode = codec.decode_global if name.startswith("global") else codec.decode_update
    with pytest.raises(codec.DecodeError):
        decode(payload + b"\0")
    raw = zstandard.ZstdDecompressor().decompress(payload)
    with pytest.raises(codec.DecodeError, match="checksum"):
        decode(zstandard.ZstdCompressor().compress(raw))


def test_global_vector_decodes_to_its_json() -> None:
    payload, expected = _load("global")
    header = expected["header"]
    message = codec.decode_global(payload)
    assert (message.federation, message.round, message.final) == (
        header["federation"], header["round"], header["final"])
    assert message.train == TrainConfig(header["local_steps"], header["learning_rate"],
                                        header["update_encoding"], header["update_topk"])
    _assert_tensors_equal(message.adapter, expected["tensors"])


def test_fltac_global_vector_decodes_to_its_json() -> None:
    payload, expected = _load("global-fltac")
    header = expected["header"]
    message = codec.decode_global(payload)
    assert message.assignment == header["assignment"] == {"phone-0/t0": 1, "phone-1": 0}
    assert (message.task_index, list(message.task_classes or ())) == (
        header["task_index"], header["task_classes"])
    _assert_tensors_equal(message.adapter, expected["tensors"])
    assert len(message.clusters) == len(expected["clusters"]) == 2
    for got, want in zip(message.clusters, expected["clusters"], strict=True):
        _assert_tensors_equal(got, want)


@pytest.mark.parametrize("name", STATUSES)
def test_status_vector_decodes_to_its_json(name: str) -> None:
    payload, expected = _load(name)
    assert payload.decode() == expected["text"]
    assert codec.decode_status(payload) == Status(
        expected["device_id"], expected["online"], expected["problem"])
    assert ("problem" in json.loads(payload)) == (expected["problem"] is not None)


@pytest.mark.parametrize("name", UPDATES)
def test_reencoding_the_decoded_values_gives_them_back(name: str) -> None:
    # encode(json) -> decode == json: decoded values are fixed points of their encoding, so an
    # implementation that re-sends what it received does not drift.
    _, expected = _load(name)
    header = expected["header"]
    adapter = {k: np.array(v, np.float32) for k, v in expected["tensors"].items()}
    update = Update(header["federation"], header["round"], header["device_id"],
                    header["manifest_sha256"], header["num_samples"], header["update_id"],
                    adapter, header["metrics"], header["is_delta"], header.get("task", ""))
    payload = codec.encode_update(update, encoding=header["encoding"], topk=header["topk"])
    _assert_tensors_equal(codec.decode_update(payload).adapter, expected["tensors"])


def test_global_reencoding_gives_the_same_values() -> None:
    _, expected = _load("global")
    header = expected["header"]
    adapter = {k: np.array(v, np.float32) for k, v in expected["tensors"].items()}
    train = TrainConfig(header["local_steps"], header["learning_rate"],
                        header["update_encoding"], header["update_topk"])
    message = GlobalModel(header["federation"], header["round"], header["manifest_sha256"],
                          adapter, train, header["final"])
    _assert_tensors_equal(codec.decode_global(codec.encode_global(message)).adapter,
                          expected["tensors"])


def test_generator_reproduces_the_committed_json() -> None:
    # Regenerating must not silently change a vector: a change to the encoders (rounding,
    # scale choice, top-k tie-breaking, header fields) shows up here first.
    built = build_vectors()
    assert sorted(built) == NAMES
    for name, (_, expected) in built.items():
        assert to_json(expected) == (VECTOR_DIR / f"{name}.json").read_text(), name


def test_vectors_stay_small() -> None:
    sizes = {p.name: p.stat().st_size for p in VECTOR_DIR.glob("*.bin")}
    assert sizes and max(sizes.values()) < 2048, sizes
