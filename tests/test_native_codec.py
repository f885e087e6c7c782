"""The native device's wire codec (edge_client/native) against the vectors and the Python reference.

Every check compares the C++ library with tests/vectors/*.json or with protocol/ itself: decoded
vectors, encoder output (wire tensors byte for byte), the status text, rejections (the native
decoder must refuse what the reference refuses and accept what it accepts), and signed frames.
"""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edge_client.native import Buffer, NativeError, check, library, take
from protocol import codec, quant
from protocol.messages import ResidualModel, Update, check_token, new_update_id
from protocol.residual import dense_residual
from protocol.signing import (
    generate_signing_key,
    open_signed,
    public_key_bytes,
    registry_from_json,
    registry_to_json,
    save_private_key,
    sign_payload,
)
from tests.test_fuzz_codec import byte_mutations
from tests.vectors.generate import VECTOR_DIR, WIRE_KEYS, describe, make_update

NAMES = sorted(path.stem for path in VECTOR_DIR.glob("*.json"))
FRAMES = [n for n in NAMES if not n.startswith("status-")]
UPDATES = [n for n in NAMES if n.startswith("update-")]
STATUSES = [n for n in NAMES if n.startswith("status-")]
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# -- calling the library -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib(native_build: Path) -> ctypes.CDLL:
    return library()


def _load(name: str) -> tuple[bytes, dict[str, Any]]:
    expected = json.loads((VECTOR_DIR / f"{name}.json").read_text())
    return (VECTOR_DIR / expected["file"]).read_bytes(), expected


BASES = {name: _load(name) for name in NAMES}


def native_describe(payload: bytes) -> dict[str, Any]:
    """edgefl_codec_describe's JSON; NativeError with the library's reason on a rejection."""
    out = Buffer()
    check(library().edgefl_codec_describe(payload, len(payload), ctypes.byref(out)))
    return json.loads(take(out))


def native_rejects(payload: bytes) -> str:
    """The one-line reason the native decoder gives for refusing `payload` (fails if it accepts)."""
    out = Buffer()
    rc = library().edgefl_codec_describe(payload, len(payload), ctypes.byref(out))
    if rc == 0:
        take(out)
        pytest.fail("the native decoder accepted a payload the protocol rejects")
    assert rc == -1
    reason = library().edgefl_last_error().decode()
    assert reason and "\n" not in reason
    return reason


def native_encode_update(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """The native encoder's payload; tensors travel as shape and flat values (float32 exactly:
    the shortest float64 text of each value reads back as that value)."""
    doc = {"header": header,
           "tensors": {k: {"shape": list(np.shape(v)),
                           "data": np.asarray(v, np.float32).astype(np.float64).ravel().tolist()}
                       for k, v in tensors.items()}}
    out = Buffer()
    check(library().edgefl_codec_encode_update(json.dumps(doc, allow_nan=False).encode(),
                                               ctypes.byref(out)))
    return take(out)


def native_sign(key_path: Path, device_id: str, payload: bytes) -> bytes:
    out = Buffer()
    check(library().edgefl_codec_sign(str(key_path).encode(), device_id.encode(), payload,
                                      len(payload), ctypes.byref(out)))
    return take(out)


def as_f32(values: Any) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def assert_same_tensors(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same names, shapes and float32 values (bit for bit, NaN included)."""
    assert sorted(got) == sorted(want)
    for name, values in want.items():
        a, b = as_f32(got[name]), as_f32(values)
        if isinstance(got[name], list) and b.size == 0:
            b = as_f32(b.tolist())  # nested lists end at the first zero-size dimension
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


def wire_tensors(payload: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The raw safetensors tensors of a payload: dtype, shape and bytes."""
    raw = zstandard.ZstdDecompressor().decompress(payload)
    return {k: (str(v.dtype), v.shape, v.tobytes())
            for k, v in safetensors.numpy.load(raw).items()}


def vector_wire(expected: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    dtypes = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I32": np.int32}
    out = {}
    for name, t in expected["wire_tensors"].items():
        a = np.array(t["data"], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
        out[name] = (str(a.dtype), tuple(t["shape"]), a.tobytes())
    return out


def header_of(update: Update, encoding: str, topk: float | None) -> dict[str, Any]:
    header = {"federation": update.federation, "round": update.round,
              "device_id": update.device_id, "manifest_sha256": update.manifest_sha256,
              "num_samples": update.num_samples, "update_id": update.update_id,
              "metrics": update.metrics, "is_delta": update.is_delta, "encoding": encoding,
              "topk": topk}
    if update.task:
        header["task"] = update.task
    return header


# -- 1. decoding the vectors -------------------------------------------------------------------
@pytest.mark.parametrize("name", FRAMES)
def test_frame_vector_decodes_to_its_json(lib: ctypes.CDLL, name: str) -> None:
    payload, expected = _load(name)
    got = native_describe(payload)
    assert got["kind"] == expected["metadata"]["kind"] == expected["kind"]
    assert got["header"] == expected["header"]
    assert_same_tensors(got["tensors"], expected["tensors"])
    if "clusters" in expected:
        assert len(got["clusters"]) == len(expected["clusters"])
        for have, want in zip(got["clusters"], expected["clusters"], strict=True):
            assert_same_tensors(have, want)


@pytest.mark.parametrize("name", STATUSES)
def test_status_vector_decodes_to_its_json(lib: ctypes.CDLL, name: str) -> None:
    payload, expected = _load(name)
    got = native_describe(payload)
    assert got["kind"] == "status"
    assert (got["device_id"], got["online"], got["problem"]) == (
        expected["device_id"], expected["online"], expected["problem"])
    assert got["header"] == json.loads(expected["text"])


# -- 2. encoding updates -----------------------------------------------------------------------
@pytest.mark.parametrize("name", UPDATES)
def test_native_encoder_reproduces_the_vector_wire_tensors(lib: ctypes.CDLL, name: str) -> None:
    # The vector's own inputs, encoded natively, give exactly its wire tensors, its header and
    # (decoded by the reference) its tensors: same rounding, scales and top-k choice.
    _, expected = _load(name)
    update, encoding, topk = make_update(name)
    payload = native_encode_update(header_of(update, encoding, topk), update.adapter)
    assert describe(payload) == {k: expected[k] for k in WIRE_KEYS}
    assert wire_tensors(payload) == vector_wire(expected)
    decoded = codec.decode_update(payload)
    assert_same_tensors({k: v for k, v in decoded.adapter.items()}, expected["tensors"])
    assert (decoded.update_id, decoded.task, decoded.metrics) == (
        update.update_id, update.task, update.metrics)


@pytest.mark.parametrize("name", UPDATES)
def test_native_encoder_matches_python_on_decoded_values(lib: ctypes.CDLL, name: str) -> None:
    # Criterion 3 of PROTOCOL.md section 10, and byte parity with the reference's encoder.
    _, expected = _load(name)
    header = expected["header"]
    tensors = {k: as_f32(v) for k, v in expected["tensors"].items()}
    payload = native_encode_update(header, tensors)
    assert_same_tensors(codec.decode_update(payload).adapter, expected["tensors"])
    update = Update(header["federation"], header["round"], header["device_id"],
                    header["manifest_sha256"], header["num_samples"], header["update_id"],
                    tensors, header["metrics"], header["is_delta"], header.get("task", ""))
    reference = codec.encode_update(update, encoding=header["encoding"], topk=header["topk"])
    assert wire_tensors(payload) == wire_tensors(reference)
    assert native_describe(payload)["header"] == describe(reference)["header"]


FLOATS = st.one_of(
    st.floats(-1e4, 1e4, width=32),  # exactly representable bounds
    st.integers(-3, 3).map(float),  # many ties: top-k must break them as the reference does
    st.floats(-2.0**-20, 2.0**-20, width=32),
    st.sampled_from([0.0, -0.0, 65504.0, -65504.0, 1e-8, 5.960464477539063e-08]),
)


@st.composite
def adapters(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out = {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        values = draw(st.lists(FLOATS, min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))
        out[f"layer{i}.lora_A.weight"] = np.array(values, np.float32).reshape(shape)
    return out


# Scales of exactly 1 and 2 (max|x| = 127, 254): every x.5 below is a rounding tie, which goes
# to the even level; fp16 ties, and top-k ties between equal magnitudes.
TIES = {"t.weight": np.array([[127, 0.5, 1.5, 2.5], [-0.5, -1.5, 126.5, -127],
                              [254, 3, 5, -7], [1, 1, -1, 1]], np.float32),
        "t.bias": np.array([2049, 2051, 1 + 2**-11, 1 + 3 * 2**-11], np.float32)}


@FUZZ
@example(tensors=TIES, encoding="int8", topk=None)
@example(tensors=TIES, encoding="int8-channel", topk=None)
@example(tensors=TIES, encoding="int8-channel", topk=0.5)
@example(tensors=TIES, encoding="fp16", topk=0.3)
@given(tensors=adapters(), encoding=st.sampled_from(quant.ENCODINGS),
       topk=st.one_of(st.none(), st.sampled_from([1.0, 0.5, 0.25, 0.1, 1e-9]),
                      st.floats(1e-3, 1.0)))
def test_native_encoder_matches_python_on_any_input(lib: ctypes.CDLL, tensors: dict[str, Any],
                                                    encoding: str, topk: float | None) -> None:
    update = Update("f", 0, "d", "ab" * 32, 1, "d-0-1", tensors, is_delta=True)
    try:
        reference = codec.encode_update(update, encoding=encoding, topk=topk)
    except ValueError:
        # The reference cannot split a tensor of zero rows into rows (dense int8-channel).
        assume(any(len(a.shape) >= 2 and a.shape[0] == 0 for a in tensors.values()))
        return
    payload = native_encode_update(header_of(update, encoding, topk), tensors)
    assert wire_tensors(payload) == wire_tensors(reference)
    assert_same_tensors(codec.decode_update(payload).adapter,
                        codec.decode_update(reference).adapter)


def test_native_encoder_refuses_what_the_reference_refuses(lib: ctypes.CDLL) -> None:
    update, _, _ = make_update("update-fp32")
    header = header_of(update, "fp16", None)
    with pytest.raises(NativeError, match="float16"):
        native_encode_update(header, {"a": np.array([70000.0], np.float32)})
    with pytest.raises(NativeError, match="#"):
        native_encode_update(header, {"a#scale": np.zeros(1, np.float32)})
    for field, value in [("round", -1), ("num_samples", 0), ("update_id", "a b"),
                         ("encoding", "int4"), ("topk", 1.5), ("device_id", "a/b")]:
        with pytest.raises(NativeError):
            native_encode_update({**header, field: value}, update.adapter)


# -- 3. status text, and the C++ functions the C API does not expose --------------------------


@pytest.fixture(scope="module")
def probe(native_build: Path) -> Path:
    """edgefl-codec-probe: built with the library from the same codec objects (the library
    hides these C++ symbols)."""
    return native_build / "edgefl-codec-probe"


def run_probe(probe: Path, *args: str) -> bytes:
    return subprocess.run([str(probe), *args], check=True, capture_output=True).stdout


@pytest.mark.parametrize("online, device_id, problem", [
    (False, "phone-0", None), (True, "phone-1", "manifest"), (True, "phone-1", None),
    (True, "caf\u00e9 \U0001F600 \"q\" \\ \u007f", None),
])
def test_encode_status_is_byte_identical(probe: Path, online: bool, device_id: str,
                                         problem: str | None) -> None:
    args = ["status", "1" if online else "0", device_id] + ([problem] if problem else [])
    assert run_probe(probe, *args) == codec.encode_status(online, device_id, problem)


@pytest.mark.parametrize("name", STATUSES)
def test_encode_status_reproduces_the_vector(probe: Path, name: str) -> None:
    payload, expected = _load(name)
    args = ["status", "1" if expected["online"] else "0", expected["device_id"]]
    problem = [expected["problem"]] if expected["problem"] else []
    assert run_probe(probe, *args, *problem) == payload


def test_encode_status_refuses_bad_device_ids(probe: Path) -> None:
    for device_id in ["a/b", "a+b", "#", "x" * 256]:
        with pytest.raises(subprocess.CalledProcessError):
            run_probe(probe, "status", "1", device_id)
    with pytest.raises(subprocess.CalledProcessError):
        run_probe(probe, "status", "1", "phone-1", "tired")


def test_new_update_id_has_the_reference_format(probe: Path) -> None:
    ids = {run_probe(probe, "update-id", "phone-1", "7", "").decode() for _ in range(3)}
    assert len(ids) == 3  # random
    for update_id in ids:
        prefix, round_text, random_hex = update_id.rsplit("-", 2)
        assert (prefix, round_text) == ("phone-1", "7")
        assert len(random_hex) == 12 and int(random_hex, 16) >= 0
        assert random_hex == random_hex.lower()
    for device_id, task in [("caf\u00e9/\U0001F600+" + "x" * 40, "t1"), ("p:1 \u00e9", "t1"),
                            ("x" * 31, "t1"), ("phone-1", "")]:
        got = run_probe(probe, "update-id", device_id, "3", task).decode()
        want = new_update_id(device_id, 3, task)  # one "_" per character, then 32 characters
        assert got.rsplit("-", 1)[0] == want.rsplit("-", 1)[0]
        assert check_token(got, "update_id") == got


def test_encode_global_round_trips_through_the_reference(probe: Path, tmp_path: Path) -> None:
    for name in ("global", "global-fltac"):
        payload, expected = _load(name)
        out = tmp_path / f"{name}.bin"
        run_probe(probe, "reencode-global", str(VECTOR_DIR / expected["file"]), str(out))
        assert describe(out.read_bytes()) == describe(payload)
        decoded = codec.decode_global(out.read_bytes())
        assert_same_tensors(decoded.adapter, expected["tensors"])
        assert len(decoded.clusters) == len(expected.get("clusters", []))


def test_start_adapter_follows_the_assignment(probe: Path, tmp_path: Path) -> None:
    message = codec.decode_global(_load("global-fltac")[0])
    for device_id, task in [("phone-0", "t0"), ("phone-0", ""), ("phone-1", ""), ("x", "t9")]:
        out = tmp_path / "adapter.safetensors"
        run_probe(probe, "start-adapter", str(VECTOR_DIR / "global-fltac.bin"), str(out),
                  device_id, task)
        assert_same_tensors(safetensors.numpy.load_file(str(out)),
                            message.start_adapter(device_id, task))


def test_dense_residual_matches_the_reference(probe: Path, tmp_path: Path) -> None:
    # Multiples of 1/8: every product and sum is exact, whatever the summation order.
    rng = np.random.default_rng(3)
    residual = {"fc1.U": rng.integers(-8, 8, (4, 2)) / 8, "fc1.V": rng.integers(-8, 8, (2, 3)) / 8,
                "fc2.dense": rng.integers(-8, 8, (3, 3)) / 8}
    residual = {k: v.astype(np.float32) for k, v in residual.items()}
    source = tmp_path / "residual.bin"
    source.write_bytes(codec.encode_residual(ResidualModel("f", 2, "ab" * 32, residual, 0.25)))
    got = native_describe(source.read_bytes())
    assert got["kind"] == "residual" and got["header"]["truncation_error"] == 0.25
    assert_same_tensors(got["tensors"], residual)
    out = tmp_path / "dense.safetensors"
    run_probe(probe, "dense-residual", str(source), str(out))
    assert_same_tensors(safetensors.numpy.load_file(str(out)), dense_residual(residual))


def test_safetensors_files_round_trip(probe: Path, tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(2.5, np.float32),
               "c": np.zeros((0, 4), np.float32)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "in.safetensors"), metadata={"m": "1"})
    run_probe(probe, "copy", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"))
    assert_same_tensors(safetensors.numpy.load_file(str(tmp_path / "out.safetensors")), tensors)
    with safetensors.safe_open(str(tmp_path / "out.safetensors"), "numpy") as f:
        assert f.metadata() == {"m": "1"}


# -- 4. rejections -------------------------------------------------------------------------------
def _python_decode(kind: str, payload: bytes) -> Any:
    return {"global": codec.decode_global, "update": codec.decode_update,
            "residual": codec.decode_residual, "status": codec.decode_status}[kind](payload)


def _frame_mutations(payload: bytes) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    flipped = bytearray(payload)
    flipped[-1] ^= 0x01  # the last byte belongs to the content checksum
    return {
        "trailing byte": payload + b"\0",
        "no checksum": zstandard.ZstdCompressor(write_checksum=False).compress(raw),
        "flipped checksum": bytes(flipped),
        "truncated": payload[:-1],
        "half": payload[: len(payload) // 2],
        "second frame": payload + payload,
        "skippable frame after": payload + b"\x50\x2a\x4d\x18\x01\x00\x00\x00x",
        "skippable frame only": b"\x50\x2a\x4d\x18\x01\x00\x00\x00x",
        "magic only": payload[:4],
        "empty": b"",
        "body cut short": zstandard.ZstdCompressor(write_checksum=True).compress(raw[:-1]),
        "body with a trailing byte": zstandard.ZstdCompressor(write_checksum=True).compress(
            raw + b"\0"),
    }


@pytest.mark.parametrize("name", FRAMES)
def test_broken_frames_are_rejected(lib: ctypes.CDLL, name: str) -> None:
    payload, expected = _load(name)
    for what, broken in _frame_mutations(payload).items():
        with pytest.raises(codec.DecodeError):
            _python_decode(expected["kind"], broken)
        assert native_rejects(broken), what


@pytest.mark.parametrize("name", FRAMES)
def test_frames_without_content_size_are_accepted(lib: ctypes.CDLL, name: str) -> None:
    # The size field is optional; the checksum is not.
    payload, expected = _load(name)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    obj = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compressobj()
    streamed = obj.compress(raw) + obj.flush()
    assert zstandard.get_frame_parameters(streamed).content_size == zstandard.CONTENTSIZE_UNKNOWN
    _python_decode(expected["kind"], streamed)
    assert native_describe(streamed)["header"] == expected["header"]


def test_oversize_frames_are_rejected(lib: ctypes.CDLL) -> None:
    big = b"\0" * (codec.MAX_DECOMPRESSED_BYTES + 1)
    declared = zstandard.ZstdCompressor(write_checksum=True).compress(big)
    obj = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compressobj()
    undeclared = obj.compress(big) + obj.flush()
    for payload in (declared, undeclared):
        with pytest.raises(codec.DecodeError):
            codec.decode_update(payload)
        native_rejects(payload)
    native_rejects(b"\x28\xb5\x2f\xfd" + b"\0" * (codec.MAX_PAYLOAD_BYTES))
    native_rejects(b"{" * (codec.MAX_STATUS_BYTES + 1))


class Raw:
    """A JSON literal written as is (NaN, 1e400, a duplicate key), which json.dumps cannot."""

    def __init__(self, text: str) -> None:
        self.text = text


def _dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)


def _split(payload: bytes) -> tuple[dict[str, str], dict[str, Any], dict[str, np.ndarray]]:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    (length,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    return metadata, json.loads(metadata["header"]), dict(safetensors.numpy.load(raw))


def repack(payload: bytes, header: Any = None, tensors: dict[str, np.ndarray] | None = None,
           metadata: dict[str, str] | None = None) -> bytes:
    """`payload` with its header text, tensors or metadata replaced, in a valid frame."""
    old_metadata, old_header, old_tensors = _split(payload)
    text = header if isinstance(header, str) else _dumps(old_header if header is None else header)
    body = safetensors.numpy.save(old_tensors if tensors is None else tensors,
                                  metadata=metadata or {**old_metadata, "header": text})
    return zstandard.ZstdCompressor(write_checksum=True).compress(body)


def _compress(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw)


def _safetensors(header: str, buffer: bytes) -> bytes:
    text = header.encode()
    return struct.pack("<Q", len(text)) + text + buffer


UPDATE_FP32 = "update-fp32"
HOSTILE_HEADERS = {
    "unknown key": {"priority": 1},
    "round as text": {"round": "3"},
    "round too large": {"round": 2**31},
    "round negative": {"round": -1},
    "round float": {"round": Raw("3.0")},
    "round bool": {"round": True},
    "num_samples zero": {"num_samples": 0},
    "num_samples huge": {"num_samples": Raw("1" * 4301)},
    "metric NaN": {"metrics": {"loss": Raw("NaN")}},
    "metric Infinity": {"metrics": {"loss": Raw("-Infinity")}},
    "metric 1e400": {"metrics": {"loss": Raw("1e400")}},
    "metric too large": {"metrics": {"loss": 1e16}},
    "metric bad name": {"metrics": {"bad name": 1}},
    "17 metrics": {"metrics": {f"m{i}": i for i in range(17)}},
    "update_id lone surrogate": {"update_id": Raw('"\\ud800"')},
    "update_id 65 chars": {"update_id": "x" * 65},
    "update_id space": {"update_id": "phone 6"},
    "device_id slash": {"device_id": "a/b"},
    "federation empty": {"federation": ""},
    "is_delta text": {"is_delta": "yes"},
    "encoding unknown": {"encoding": "int4"},
    "topk zero": {"topk": 0},
    "topk above one": {"topk": 1.5},
    "shapes without topk": {"shapes": {}},
    "task empty": {"task": ""},
    "task with slash": {"task": "a/b"},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_rejected(lib: ctypes.CDLL, case: str) -> None:
    payload, _ = _load(UPDATE_FP32)
    header = {**_split(payload)[1], **HOSTILE_HEADERS[case]}
    hostile = repack(payload, header)
    with pytest.raises(codec.DecodeError):
        codec.decode_update(hostile)
    native_rejects(hostile)


def test_header_text_rules(lib: ctypes.CDLL) -> None:
    payload, _ = _load(UPDATE_FP32)
    text = json.dumps(_split(payload)[1])
    for hostile_text in [
        text.replace('"round": 3', '"round": 3, "round": 3'),  # a duplicate key
        text.replace('"metrics": {', '"metrics": {"a": 1, "a": 2, '),
        "\ufeff" + text,  # a byte order mark
        text[:-1],  # truncated
        text + " x",  # trailing data
        "[" + text + "]",  # not an object
        text.replace('"round": 3', '"round": 03'),
    ]:
        hostile = repack(payload, hostile_text)
        with pytest.raises(codec.DecodeError):
            codec.decode_update(hostile)
        native_rejects(hostile)
    # Accepted by both: whitespace around the object, escapes, -0, 1.0e0 for a number field.
    for fine_text in [" \n" + text + "\t\r ", text.replace('"vectors"', '"\\u0076ectors"'),
                      text.replace('"topk": null', '"topk": null ')]:
        fine = repack(payload, fine_text)
        assert native_describe(fine)["header"] == json.loads(fine_text)


def _tensor_edit(name: str, edit: Any) -> bytes:
    payload, _ = _load(name)
    _, _, tensors = _split(payload)
    edit(tensors)
    return repack(payload, tensors=tensors)


TENSOR_EDITS = {
    "scale missing": ("update-int8", lambda t: t.pop("fc1.lora_A.weight#scale")),
    "scale shape": ("update-int8-channel",
                    lambda t: t.update({"fc1.lora_B.weight#scale": np.ones(3, np.float32)})),
    "scale negative": ("update-int8", lambda t: t.update(
        {"head.bias#scale": np.array([-1.0], np.float32)})),
    "scale NaN": ("update-int8", lambda t: t.update(
        {"head.bias#scale": np.array([np.nan], np.float32)})),
    "scale F16": ("update-int8", lambda t: t.update(
        {"head.bias#scale": np.array([1.0], np.float16)})),
    "value dtype": ("update-fp16", lambda t: t.update(
        {"head.bias": t["head.bias"].astype(np.float32)})),
    "extra tensor": ("update-fp32-topk", lambda t: t.update({"extra": np.zeros(1, np.float32)})),
    "extra role": ("update-fp32", lambda t: t.update({"head.bias#scale": np.ones(1, np.float32)})),
    "indices decreasing": ("update-fp32-topk", lambda t: t.update(
        {"fc1.lora_A.weight#indices": t["fc1.lora_A.weight#indices"][::-1].copy()})),
    "indices out of range": ("update-fp32-topk", lambda t: t.update(
        {"head.bias#indices": np.array([7], np.int32)})),
    "indices negative": ("update-fp32-topk", lambda t: t.update(
        {"head.bias#indices": np.array([-1], np.int32)})),
    "indices and values differ": ("update-fp32-topk", lambda t: t.update(
        {"head.bias#values": np.zeros(2, np.float32)})),
    "indices 2-D": ("update-int8-channel-topk", lambda t: t.update(
        {"head.bias#indices": t["head.bias#indices"].reshape(1, -1).copy(),
         "head.bias#values": t["head.bias#values"].reshape(1, -1).copy()})),
    "indices I64": ("update-fp32-topk", lambda t: t.update(
        {"head.bias#indices": t["head.bias#indices"].astype(np.int64)})),
    "values missing": ("update-fp32-topk", lambda t: t.pop("head.bias#values")),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_bad_wire_tensors_are_rejected(lib: ctypes.CDLL, case: str) -> None:
    name, edit = TENSOR_EDITS[case]
    hostile = _tensor_edit(name, edit)
    with pytest.raises(codec.DecodeError):
        codec.decode_update(hostile)
    native_rejects(hostile)


def test_huge_declared_shapes_are_rejected(lib: ctypes.CDLL) -> None:
    payload, _ = _load("update-fp32-topk")
    header = _split(payload)[1]
    for shape in ([2**31 - 1, 2**31 - 1], [4096, 4096 + 1], [2**31 - 1] * 8, [1] * 9, [-1],
                  [1.5]):
        hostile = repack(payload, {**header, "shapes": {**header["shapes"], "head.bias": shape}})
        with pytest.raises(codec.DecodeError):
            codec.decode_update(hostile)
        native_rejects(hostile)


def _body(top: dict[str, Any], buffer: bytes) -> bytes:
    """A compressed safetensors file from its header (a dict, Raw values allowed) and buffer."""
    return _compress(_safetensors(_dumps(top), buffer))


def _edited(top: dict[str, Any], name: str, **info: Any) -> dict[str, Any]:
    return {**top, name: {**top[name], **info}}


def _variants(name: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Safetensors files around vector `name`'s header: (rejected ones, accepted ones)."""
    raw = zstandard.ZstdDecompressor().decompress(BASES[name][0])
    (length,) = struct.unpack("<Q", raw[:8])
    top, buffer = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    metadata = top["__metadata__"]
    last = max((k for k in top if k != "__metadata__"), key=lambda k: top[k]["data_offsets"])
    end = top[last]["data_offsets"][1]
    info = dict(top[last])
    bad = {
        "trailing buffer byte": _compress(raw + b"\0"),
        "header past the end": _compress(struct.pack("<Q", len(raw)) + raw[8:]),
        "short": _compress(raw[:7]),
        "metadata missing": _body({k: v for k, v in top.items() if k != "__metadata__"}, buffer),
        "metadata extra key": _body({**top, "__metadata__": {**metadata, "x": "y"}}, buffer),
        "metadata null": _body({**top, "__metadata__": None}, buffer),
        "schema 2": _body({**top, "__metadata__": {**metadata, "schema": "2"}}, buffer),
        "unknown kind": _body({**top, "__metadata__": {**metadata, "kind": "gossip"}}, buffer),
        "header not a string": _body({**top, "__metadata__": {**metadata, "header": Raw("{}")}},
                                     buffer),
        "gap in offsets": _body(_edited(top, last, data_offsets=[end - 8, end + 4]),
                                buffer + b"\0" * 4),
        "offsets past the end": _body(_edited(top, last, data_offsets=[end - 12, end + 4]),
                                      buffer),
        "unknown dtype": _body(_edited(top, last, dtype="Q32"), buffer),
        "BF16": _body(_edited(top, last, dtype="BF16"), buffer),
        "duplicate key": _body({**top, last: Raw('{"dtype": "F32", "dtype": "F32", "shape": '
                                                 + json.dumps(info["shape"])
                                                 + ', "data_offsets": '
                                                 + json.dumps(info["data_offsets"]) + "}")},
                               buffer),
        "nesting past serde's limit": _body(_edited(top, last, n=Raw("[" * 126 + "]" * 126)),
                                            buffer),
        "shape float": _body(_edited(top, last, shape=[float(d) for d in info["shape"]]),
                             buffer),
        "zero-size tensor with shape -0": _body(
            {**top, "z": {"dtype": "F32", "shape": Raw("[-0]"), "data_offsets": [end, end]}},
            buffer),
        "tensor info of 4 items": _body({**top, last: [info["dtype"], info["shape"],
                                                       info["data_offsets"], 1]}, buffer),
        "dtype map of two": _body(_edited(top, last, dtype={"F32": None, "F16": None}), buffer),
        "too many dimensions": _body(_edited(top, last, shape=info["shape"] + [1] * 64), buffer),
    }
    fine = {
        "as written": _body(top, buffer),
        "tensor info as a list": _body({**top, last: [info["dtype"], info["shape"],
                                                      info["data_offsets"]]}, buffer),
        "dtype as an enum map": _body(_edited(top, last, dtype={info["dtype"]: None}), buffer),
        "unknown tensor info key": _body(_edited(top, last, x=[[1]], y=Raw("1" * 300)), buffer),
        "nesting at serde's limit": _body(_edited(top, last, n=Raw("[" * 125 + "]" * 125)),
                                          buffer),
        "leading space": _compress(_safetensors(" " + _dumps(top), buffer)),
        "trailing spaces": _compress(_safetensors(_dumps(top) + "   ", buffer)),
        "metadata last": _body({**{k: v for k, v in top.items() if k != "__metadata__"},
                                "__metadata__": metadata}, buffer),
    }
    return bad, fine


@pytest.mark.parametrize("name", FRAMES)
def test_safetensors_rules(lib: ctypes.CDLL, name: str) -> None:
    kind = BASES[name][1]["kind"]
    bad, fine = _variants(name)
    for what, payload in bad.items():
        assert _python_verdict(kind, payload) is None, what
        assert native_rejects(payload), what
    for what, payload in fine.items():
        assert _python_verdict(kind, payload) is not None, what
        assert_same_verdict(kind, payload)


def test_zero_size_tensor_in_a_global_is_accepted(lib: ctypes.CDLL) -> None:
    raw = zstandard.ZstdDecompressor().decompress(BASES["global"][0])
    (length,) = struct.unpack("<Q", raw[:8])
    top, buffer = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    end = max(v["data_offsets"][1] for k, v in top.items() if k != "__metadata__")
    payload = _body({**top, "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [end, end]}},
                    buffer)
    assert native_describe(payload)["tensors"]["z"] == []
    assert_same_verdict("global", payload)


# -- differential fuzzing: the native decoder decides as the reference does ----------------------
def _python_verdict(kind: str, payload: bytes) -> Any:
    try:
        return _python_decode(kind, payload)
    except codec.DecodeError:
        return None


def _native_verdict(payload: bytes) -> dict[str, Any] | None:
    out = Buffer()
    rc = library().edgefl_codec_describe(payload, len(payload), ctypes.byref(out))
    if rc != 0:
        assert rc == -1
        reason = library().edgefl_last_error().decode()
        assert reason and "\n" not in reason
        return None
    return json.loads(take(out))


def assert_same_verdict(kind: str, payload: bytes) -> None:
    python = _python_verdict(kind, payload)
    native = _native_verdict(payload)
    if python is not None and kind == "global" and any(
            np.asarray(t).dtype != np.float32 for adapter in (python.adapter, *python.clusters,
                                                             python.residual_step)
            for t in adapter.values()):
        # The one documented difference: globals are dense F32 on the device; the reference
        # decoder takes any numpy dtype there.
        assert native is None
        return
    assert (python is None) == (native is None), (python, native)
    if python is None:
        return
    if kind == "status":
        assert (native["device_id"], native["online"], native["problem"]) == (
            python.device_id, python.online, python.problem)
        return
    assert native["header"] == _split(payload)[1]
    tensors = python.residual if kind == "residual" else python.adapter
    assert_same_tensors(native["tensors"], tensors)


NASTY = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**63, 2**64, 10**20, -(10**20), 0.5, 1.0,
                     1e15, 1e16, -0.0, 1e-310, "", "a/b", "x" * 64, "x" * 65, "caf\u00e9",
                     "\ud800", "fp16", "int8", "int8-channel", "t1", [], {}, [3], [[1]],
                     {"a": 1}, {"train_loss": 1e15}, {"a": [2, 3]}, Raw("1e400"), Raw("NaN"),
                     Raw("5.0"), Raw("-0"), Raw("1E2"), Raw("1" * 4301), Raw("1" * 400)]),
    st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)


SEGMENTS = ["f", "x" * 255, "x" * 256, "\u00e9" * 127, "\u00e9" * 128, "a b", "a\0b",
            "\U0001F600", "a+b", "a#b", "phone-0"]
INTS = [0, 1, 2**31 - 1, 2**31, -1, True, Raw("1.0"), Raw("-0"), Raw("1e0"), "1"]
FRACTIONS = [None, 1, 1.0, 0.5, 0, -0.0, 1.0000000000000002, 5e-324, Raw("1e-400"),
             Raw("1" + "0" * 308), Raw("1" + "0" * 309), True]
# Per field, values next to its rules' boundaries, valid and not (Python decides which).
FIELD_VALUES: dict[str, list[Any]] = {
    "federation": SEGMENTS, "device_id": SEGMENTS,
    "round": INTS, "num_samples": INTS, "local_steps": INTS, "task_index": INTS,
    "manifest_sha256": ["a" * 64, "a" * 65, "a:b", "a b", "", "\u00e9"],
    "update_id": ["a" * 64, "a" * 65, "a:b.c_d-e", "a b", "", "\u00e9"],
    "metrics": [{}, {"a": 1e15}, {"a": -1e15}, {"a": 1e15 + 0.125}, {"a": 10**15},
                {"a": 10**15 + 1}, {"a": -(10**15) - 1}, {"a": Raw("1E15")}, {"a": Raw("1e-400")},
                {f"m{i}": i for i in range(16)}, {f"m{i}": i for i in range(17)},
                {"a.b-c_d": 0}, {"x" * 64: 1}, {"x" * 65: 1}, {"a:b": 1}, {"": 1},
                {"a": True}, {"a": None}, {"a": 2**70}],
    "is_delta": [True, False, 0, "true"], "final": [True, False, 1, None],
    "encoding": ["fp32", "fp16", "int8", "int8-channel", "FP32", ""],
    "update_encoding": ["fp32", "fp16", "int8", "int8-channel", "FP32", ""],
    "topk": FRACTIONS, "update_topk": FRACTIONS, "truncation_error": FRACTIONS,
    "learning_rate": [1e-300, 1e308, 5e-324, Raw("1" + "0" * 308), Raw("1" + "0" * 309), 0,
                      -1, Raw("1.7976931348623157e308"), Raw("1.8e308"), 2],
    "task": ["t1", "x" * 32, "x" * 33, "", "a:b", "a/b", None],
    "assignment": [{}, {"phone-0": 0}, {"phone-0/t0": 1}, {"phone-0/": 0}, {"/t": 0},
                   {"p": 2}, {"p": -1}, {"p/a/b": 0}, {"p/" + "x" * 33: 0}, {"a+b": 0}, []],
    "task_classes": [[0], [], [2**31 - 1], [2**31], [1.0], None, [0, 0], 0],
    "residual": [True, False, None, 1],
    "shapes": [{}, {"head.bias": [3]}, {"head.bias": []}, []],
}


@st.composite
def field_value(draw: st.DrawFn, field: str) -> Any:
    near = FIELD_VALUES.get(field)
    if near and draw(st.integers(0, 3)):
        return draw(st.sampled_from(near))
    return draw(NASTY)


def _residual_base() -> tuple[bytes, dict[str, Any]]:
    # Not a committed vector: the residual topic's message, built by the reference.
    tensors = {"fc1.U": np.arange(8, dtype=np.float32).reshape(4, 2) / 8,
               "fc1.V": np.ones((2, 3), np.float32), "fc2.dense": np.eye(3, dtype=np.float32)}
    message = ResidualModel("vectors", 4, "ab" * 32, tensors, 0.125)
    payload = codec.encode_residual(message)
    return payload, {"kind": "residual", "header": _split(payload)[1]}


BASES["residual"] = _residual_base()
FUZZ_FRAMES = [*FRAMES, "residual"]


@FUZZ
@given(name=st.sampled_from(FUZZ_FRAMES), data=st.data())
def test_header_mutations_get_the_reference_verdict(lib: ctypes.CDLL, name: str,
                                                    data: st.DataObject) -> None:
    payload, expected = BASES[name]
    header = dict(expected["header"])
    fields = sorted(header) + ["shapes", "metrics", "task", "assignment", "task_index",
                               "task_classes", "residual", "extra"]
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(fields))
        if data.draw(st.integers(0, 3)) == 0:
            header.pop(field, None)
        else:
            header[field] = data.draw(field_value(field))
    assert_same_verdict(expected["kind"], repack(payload, header))


STATUS_VALUES: dict[str, list[Any]] = {
    "schema": [1, Raw("1.0"), True, "1", 2, Raw("1e0"), Raw("-0"), Raw("01"), 2**64],
    "device_id": SEGMENTS, "online": [True, False, 0, None, "true"],
    "problem": ["manifest", None, "Manifest", "", 1], "extra": [1, None],
}


@FUZZ
@given(data=st.data(), spaces=st.sampled_from(["", " ", "\n\t", "\ufeff"]))
def test_status_mutations_get_the_reference_verdict(lib: ctypes.CDLL, data: st.DataObject,
                                                    spaces: str) -> None:
    status: dict[str, Any] = {"schema": 1, "device_id": "phone-1", "online": True,
                              "problem": "manifest"}
    for _ in range(data.draw(st.integers(0, 3))):
        field = data.draw(st.sampled_from(sorted(STATUS_VALUES)))
        if data.draw(st.integers(0, 3)) == 0:
            status.pop(field, None)
        else:
            status[field] = data.draw(st.one_of(st.sampled_from(STATUS_VALUES[field]), NASTY))
    assert_same_verdict("status", (spaces + _dumps(status) + spaces).encode("utf-8", "replace"))


@FUZZ
@given(name=st.sampled_from([*NAMES, "residual"]), data=st.data())
def test_body_mutations_get_the_reference_verdict(lib: ctypes.CDLL, name: str,
                                                  data: st.DataObject) -> None:
    payload, expected = BASES[name]
    if expected["kind"] == "status":
        assert_same_verdict("status", data.draw(byte_mutations(payload)))
        return
    raw = zstandard.ZstdDecompressor().decompress(payload)
    assert_same_verdict(expected["kind"], _compress(data.draw(byte_mutations(raw))))


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300),
                         st.binary(max_size=300).map(lambda b: b"\x28\xb5\x2f\xfd" + b),
                         st.binary(max_size=300).map(_compress),
                         st.sampled_from(FRAMES).flatmap(
                             lambda n: byte_mutations(BASES[n][0]))))
def test_describe_never_crashes(lib: ctypes.CDLL, payload: bytes) -> None:
    out = Buffer()
    rc = library().edgefl_codec_describe(payload, len(payload), ctypes.byref(out))
    assert rc in (0, -1)
    if rc == 0:
        json.loads(take(out))
    else:
        assert "\n" not in library().edgefl_last_error().decode()


# -- 5. signed frames ------------------------------------------------------------------------------
def test_native_signature_verifies_and_matches_python(lib: ctypes.CDLL, tmp_path: Path) -> None:
    key = generate_signing_key()
    save_private_key(key, tmp_path / "signing.key")
    registry = registry_from_json(registry_to_json({"phone-1": public_key_bytes(key)}))
    for payload in (_load(UPDATE_FP32)[0], b"", b"\0" * 1000):
        frame = native_sign(tmp_path / "signing.key", "phone-1", payload)
        assert open_signed(registry, "phone-1", frame) == payload
        assert frame == sign_payload(key, "phone-1", payload)  # Ed25519 is deterministic
    unicode_id = "t\u00e9l\u00e9phone"
    assert (native_sign(tmp_path / "signing.key", unicode_id, b"x")
            == sign_payload(key, unicode_id, b"x"))


def test_native_signing_refuses_bad_keys_and_ids(lib: ctypes.CDLL, tmp_path: Path) -> None:
    key = generate_signing_key()
    save_private_key(key, tmp_path / "signing.key")
    for device_id in ("", "x" * 256):
        with pytest.raises(NativeError):
            native_sign(tmp_path / "signing.key", device_id, b"payload")
    with pytest.raises(NativeError, match="signing key"):
        native_sign(tmp_path / "missing.key", "phone-1", b"payload")
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "ec.key").write_bytes(other)
    with pytest.raises(NativeError, match="Ed25519"):
        native_sign(tmp_path / "ec.key", "phone-1", b"payload")
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    with pytest.raises(NativeError, match="signing key"):  # refused, never a passphrase prompt
        native_sign(tmp_path / "encrypted.key", "phone-1", b"payload")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(NativeError):
        native_sign(tmp_path / "junk.key", "phone-1", b"payload")
