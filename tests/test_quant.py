"""Compact encodings: round trips, per-encoding error bounds, top-k selection, sizes, rejections."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import codec, quant
from protocol.messages import Update
from tests.conftest import make_adapter

SHAPES = {"fc1.lora_A.weight": (4, 96), "fc1.lora_B.weight": (64, 4), "head.bias": (10,)}


def _round_trip(tensors: dict[str, np.ndarray], encoding: str,
                topk: float | None = None) -> dict[str, np.ndarray]:
    wire = quant.encode_tensors(tensors, encoding, topk)
    shapes = {k: v.shape for k, v in tensors.items()} if topk is not None else None
    return quant.decode_tensors(wire, encoding, shapes)


def _int8_bound(x: np.ndarray, decoded: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # Exactly scale/2: scales keep 17 significant bits, so q·scale itself is not rounded.
    del x, decoded
    return np.asarray(scale, np.float64) / 2


def _error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x.astype(np.float64) - y.astype(np.float64))  # exact for float32 inputs


def _rows_of_different_magnitude(seed: int) -> np.ndarray:
    # LoRA B rows often differ by orders of magnitude: the case per-row scales exist for.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((8, 32)) * np.logspace(-4, 0, 8)[:, None]).astype(np.float32)


# -- dense round trips and error bounds ---------------------------------------------------

def test_fp32_is_the_identity_and_keeps_nan_for_the_receiver_to_reject() -> None:
    tensors = make_adapter(1, SHAPES)
    tensors["head.bias"][3] = np.nan
    decoded = _round_trip(tensors, "fp32")
    for name, x in tensors.items():
        np.testing.assert_array_equal(decoded[name], x)  # NaN == NaN for this helper
        assert decoded[name].dtype == np.float32


def test_fp16_error_is_within_half_an_fp16_ulp() -> None:
    rng = np.random.default_rng(2)
    # magnitudes from fp16 subnormals (< 2**-14) up to 1e4
    x = (rng.standard_normal(4000) * np.logspace(-7, 4, 4000)).astype(np.float32)
    y = _round_trip({"x": x}, "fp16")["x"]
    err = np.abs(y - x)
    assert y.dtype == np.float32
    assert np.all(err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))
    assert err.max() > 0  # it is lossy: the bound is what is being tested


def test_int8_per_tensor_error_is_at_most_half_the_scale() -> None:
    x = make_adapter(3, {"w": (64, 96)})["w"]
    wire = quant.encode_tensors({"w": x}, "int8")
    scale = wire["w#scale"]
    assert wire["w"].dtype == np.int8 and scale.shape == (1,)
    assert scale[0] * 127 >= np.abs(x).max() > scale[0] * 126.99
    assert np.abs(wire["w"]).max() == 127 and wire["w"].min() >= -127
    y = quant.decode_tensors(wire, "int8")["w"]
    assert np.all(_error(x, y) <= _int8_bound(x, y, scale[0]))
    assert np.abs(y - x).max() > scale[0] / 4  # rounding really happens


def test_int8_channel_scales_each_row_and_beats_per_tensor_on_uneven_rows() -> None:
    x = _rows_of_different_magnitude(4)
    wire = quant.encode_tensors({"w": x}, "int8-channel")
    scale = wire["w#scale"]
    assert scale.shape == (8,)
    np.testing.assert_array_equal(np.abs(wire["w"]).max(axis=1), np.full(8, 127))
    y = quant.decode_tensors(wire, "int8-channel")["w"]
    assert np.all(_error(x, y) <= _int8_bound(x, y, scale[:, None]))
    per_tensor = _round_trip({"w": x}, "int8")["w"]
    small_rows = slice(0, 4)  # rows scaled 1e-4..1e-2: per-tensor int8 flattens them to ~0
    assert (np.abs(y - x)[small_rows].max() * 100
            < np.abs(per_tensor - x)[small_rows].max())


@pytest.mark.parametrize("shape", [(10,), ()])
def test_int8_channel_is_per_tensor_below_two_dimensions(shape: tuple[int, ...]) -> None:
    x = np.asarray(np.random.default_rng(5).standard_normal(shape), np.float32)
    channel = quant.encode_tensors({"b": x}, "int8-channel")
    tensor = quant.encode_tensors({"b": x}, "int8")
    assert channel["b#scale"].shape == (1,)
    np.testing.assert_array_equal(channel["b"], tensor["b"])
    assert _round_trip({"b": x}, "int8-channel")["b"].shape == shape


def test_int8_channel_uses_axis_zero_of_higher_rank_tensors() -> None:
    x = np.random.default_rng(6).standard_normal((3, 2, 5)).astype(np.float32)
    x[1] *= 100
    scale = quant.encode_tensors({"k": x}, "int8-channel")["k#scale"]
    expected = np.abs(x).reshape(3, -1).max(axis=1) / 127
    np.testing.assert_allclose(scale, expected, rtol=2.0**-16)  # 17-bit scales, rounded up
    y = _round_trip({"k": x}, "int8-channel")["k"]
    assert np.all(_error(x, y) <= _int8_bound(x, y, scale[:, None, None]))


@pytest.mark.parametrize("encoding", ["int8", "int8-channel"])
def test_all_zero_tensor_gets_scale_zero_and_decodes_to_exact_zeros(encoding: str) -> None:
    x = np.zeros((3, 4), np.float32)
    wire = quant.encode_tensors({"w": x}, encoding)
    assert np.all(wire["w#scale"] == 0)
    np.testing.assert_array_equal(quant.decode_tensors(wire, encoding)["w"], x)


def test_int8_channel_zero_rows_get_scale_zero() -> None:
    x = np.zeros((3, 4), np.float32)
    x[2, 1] = 0.5
    wire = quant.encode_tensors({"w": x}, "int8-channel")
    np.testing.assert_array_equal(wire["w#scale"][:2], [0, 0])
    y = quant.decode_tensors(wire, "int8-channel")["w"]
    assert np.count_nonzero(y) == 1 and abs(y[2, 1] - 0.5) <= wire["w#scale"][2] / 2


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                  elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_int8_bounds_hold_for_any_finite_float32(x: np.ndarray) -> None:
    # Includes subnormals, where a scale rounded to nearest could clip the largest entry.
    for encoding in ("int8", "int8-channel"):
        wire = quant.encode_tensors({"x": x}, encoding)
        scale = wire["x#scale"]
        y = quant.decode_tensors(wire, encoding)["x"]
        per_entry = scale.reshape(-1, *([1] * (x.ndim - 1))) if scale.size > 1 else scale[0]
        assert np.all(np.isfinite(y))
        assert np.all(_error(x, y) <= _int8_bound(x, y, per_entry))


@pytest.mark.parametrize("x", [
    np.array([3.4028235e38, -1e38, 1.0], np.float32),  # 127·scale must not overflow to inf
    np.array([1e-45, -3e-45, 0.0], np.float32),  # subnormals: scale on float32's finest grid
    np.array([1e-39, 2.5e-40, -7e-41], np.float32),
])
@pytest.mark.parametrize("encoding", ["int8", "int8-channel"])
def test_int8_bounds_hold_at_the_ends_of_float32(x: np.ndarray, encoding: str) -> None:
    wire = quant.encode_tensors({"x": x}, encoding)
    y = quant.decode_tensors(wire, encoding)["x"]
    assert np.all(np.isfinite(y))
    assert np.all(_error(x, y) <= _int8_bound(x, y, wire["x#scale"][0]))


@pytest.mark.parametrize("encoding", ["int8", "int8-channel"])
@pytest.mark.parametrize("seed", range(5))
def test_int8_products_are_exact_and_reencoding_is_a_fixed_point(encoding: str, seed: int) -> None:
    x = _rows_of_different_magnitude(seed)
    wire = quant.encode_tensors({"w": x}, encoding)
    scale = wire["w#scale"].astype(np.float64)
    mantissa, _ = np.frexp(scale)
    assert np.all(mantissa * 2**17 == np.round(mantissa * 2**17))  # <= 17 significant bits
    y = quant.decode_tensors(wire, encoding)["w"]
    per_row = scale[:, None] if scale.size > 1 else scale[0]
    np.testing.assert_array_equal(y.astype(np.float64), wire["w"].astype(np.float64) * per_row)
    again = quant.encode_tensors({"w": y}, encoding)
    np.testing.assert_array_equal(again["w"], wire["w"])
    np.testing.assert_array_equal(again["w#scale"], wire["w#scale"])


# -- top-k --------------------------------------------------------------------------------

def test_topk_keeps_exactly_the_largest_magnitudes_and_zeros_the_rest() -> None:
    x = make_adapter(7, {"w": (16, 25)})["w"]  # 400 entries, 10% -> 40 kept
    indices, values = quant.sparsify_topk(x, 0.1)
    assert indices.dtype == np.int32 and len(indices) == 40
    assert np.all(np.diff(indices) > 0)
    expected = np.sort(np.argsort(-np.abs(x), axis=None)[:40])
    np.testing.assert_array_equal(indices, expected)
    y = _round_trip({"w": x}, "fp32", 0.1)["w"]
    kept = np.zeros(x.size, bool)
    kept[expected] = True
    kept = kept.reshape(x.shape)
    np.testing.assert_array_equal(y[kept], x[kept])  # fp32 values travel exactly
    assert np.all(y[~kept] == 0)
    assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()


def test_topk_breaks_ties_towards_the_lower_index() -> None:
    x = np.array([1.0, -2.0, 2.0, 0.5, -2.0], np.float32)
    indices, values = quant.sparsify_topk(x, 0.4)
    np.testing.assert_array_equal(indices, [1, 2])
    np.testing.assert_array_equal(values, [-2.0, 2.0])


@pytest.mark.parametrize(("size", "topk", "count"), [
    (400, 0.1, 40), (401, 0.1, 41), (10, 0.01, 1), (7, 1.0, 7), (1, 0.5, 1), (0, 0.5, 0),
])
def test_topk_count_rounds_up_and_keeps_at_least_one(size: int, topk: float, count: int) -> None:
    assert quant.topk_count(size, topk) == count


@pytest.mark.parametrize("encoding", ["fp16", "int8", "int8-channel"])
def test_topk_combines_with_each_value_encoding(encoding: str) -> None:
    x = _rows_of_different_magnitude(8)
    wire = quant.encode_tensors({"w": x}, encoding, 0.25)
    indices = wire["w#indices"]
    assert set(wire) == {"w#indices", "w#values"} | ({"w#scale"} if "int8" in encoding else set())
    assert wire["w#values"].dtype == (np.float16 if encoding == "fp16" else np.int8)
    y = quant.decode_tensors(wire, encoding, {"w": x.shape})["w"]
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    dropped = np.setdiff1d(np.arange(x.size), indices)
    assert np.all(flat_y[dropped] == 0)
    kept_x, kept_y = flat_x[indices], flat_y[indices]
    if encoding == "fp16":
        bound = np.abs(kept_x) * 2.0**-11
    elif encoding == "int8":
        bound = _int8_bound(kept_x, kept_y, wire["w#scale"][0])
    else:
        bound = _int8_bound(kept_x, kept_y, wire["w#scale"][indices // x.shape[1]])
    assert np.all(_error(kept_x, kept_y) <= bound)


def test_sparse_int8_channel_scales_come_from_kept_entries_only() -> None:
    x = np.array([[10.0, 0.1, 0.2], [0.3, 0.05, 0.01]], np.float32)
    wire = quant.encode_tensors({"w": x}, "int8-channel", 0.5)  # keeps 10, 0.3, 0.2
    np.testing.assert_array_equal(wire["w#indices"], [0, 2, 3])
    # 17-bit scales, rounded up
    np.testing.assert_allclose(wire["w#scale"], [10 / 127, 0.3 / 127], rtol=2.0**-16)
    y = quant.decode_tensors(wire, "int8-channel", {"w": (2, 3)})["w"]
    assert abs(y[1, 0] - 0.3) <= wire["w#scale"][1] / 2  # with 10/127 it would be off by 0.015


# -- sizes --------------------------------------------------------------------------------

def test_compressed_size_orders_int8_below_fp16_below_fp32() -> None:
    # Prepare: a LoRA-sized delta, Gaussian like trained weight changes
    adapter = {k: v * 1e-3 for k, v in make_adapter(9, {"a": (8, 1024), "b": (512, 8)}).items()}
    update = Update("f", 1, "d", "h" * 64, 32, "u", adapter, is_delta=True)

    # Execute
    size = {e: len(codec.encode_update(update, encoding=e)) for e in quant.ENCODINGS}
    sparse = len(codec.encode_update(update, encoding="int8", topk=0.1))

    # Assert: fp32 does not compress random floats; the others roughly halve and quarter it
    raw_fp32 = 4 * sum(v.size for v in adapter.values())
    assert size["fp32"] > 0.85 * raw_fp32
    assert size["int8"] < size["fp16"] < size["fp32"]
    assert size["fp16"] < 0.55 * size["fp32"] and size["int8"] < 0.3 * size["fp32"]
    assert size["int8-channel"] < size["fp16"]
    assert sparse < 0.5 * size["int8"]


# -- rejections ---------------------------------------------------------------------------

@pytest.mark.parametrize(("encoding", "topk", "match"), [
    ("int4", None, r"valid encodings are \['fp32', 'fp16', 'int8', 'int8-channel'\]"),
    ("FP16", None, "unknown encoding 'FP16'"),
    ("fp16", 0.0, "topk"),
    ("fp16", -0.1, "topk"),
    ("fp16", 1.5, "topk"),
    ("fp16", math.nan, "topk"),
    ("fp16", "0.1", "topk"),
    ("fp16", True, "topk"),
])
def test_encode_rejects_bad_encoding_or_topk(encoding: str, topk: object, match: str) -> None:
    tensors = {"x": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=match):
        quant.encode_tensors(tensors, encoding, topk)  # type: ignore[arg-type]


def test_decode_rejects_unknown_encoding_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid encodings"):
        quant.decode_tensors({"x": np.ones(3, np.float32)}, "bf16")


@pytest.mark.parametrize(("tensors", "encoding", "topk", "match"), [
    ({"a#b": np.ones(2, np.float32)}, "fp32", None, "must not contain '#'"),
    ({"x": np.ones(2, np.int32)}, "fp32", None, "float dtype"),
    ({"x": np.array([1.0, np.nan], np.float32)}, "int8", None, "NaN or Inf"),
    ({"x": np.array([1.0, np.inf], np.float32)}, "fp16", None, "NaN or Inf"),
    ({"x": np.array([1.0, np.nan], np.float32)}, "fp32", 0.5, "NaN or Inf"),
    ({"x": np.array([1.0, 70000.0], np.float32)}, "fp16", None, "float16"),
    ({"x": np.array([1.0, -70000.0], np.float32)}, "fp16", 0.5, "float16"),
])
def test_encode_rejects_tensors_the_encoding_cannot_carry(
    tensors: dict[str, np.ndarray], encoding: str, topk: float | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        quant.encode_tensors(tensors, encoding, topk)


def test_decode_rejects_results_over_the_dense_byte_bound() -> None:
    wire = quant.encode_tensors({"x": np.ones((10, 10), np.float32)}, "int8")
    assert quant.decode_tensors(wire, "int8", max_dense_bytes=400)["x"].shape == (10, 10)
    with pytest.raises(ValueError, match="bytes"):
        quant.decode_tensors(wire, "int8", max_dense_bytes=399)
