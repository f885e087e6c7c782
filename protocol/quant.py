"""Compact adapter updates: fp16 and int8 quantisation and top-k sparsification of named tensors.

`encode_tensors` turns `{name: float array}` into the wire tensors of a message body and
`decode_tensors` restores dense float32 arrays of the original shapes; docs/PROTOCOL.md gives
the tensor naming (`<name>`, `<name>#scale`, `<name>#indices`, `<name>#values`) and the error
bounds. Per-row int8 scales follow LLM.int8() (Dettmers et al., 2022,
https://arxiv.org/abs/2208.07339); top-k follows "Sparsified SGD with memory" (Stich et al.,
2018, https://arxiv.org/abs/1809.07599) without its error-feedback memory.

Error per decoded entry (tested in tests/test_quant.py): fp32 exact; fp16 <= |x|·2**-11
(<= 2**-25 below 2**-14); int8 and int8-channel <= scale/2 of the tensor or row; entries that
top-k drops decode to exactly 0 and are no larger in magnitude than any kept entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from protocol.tensors import TensorDict

ENCODINGS = ("fp32", "fp16", "int8", "int8-channel")
SCALE_SUFFIX = "#scale"
INDICES_SUFFIX = "#indices"
VALUES_SUFFIX = "#values"
# Symmetric levels: -128 is never produced, so the range is sign-balanced and 0 maps to 0.
INT8_LEVELS = 127
FP16_MAX = float(np.finfo(np.float16).max)  # 65504; larger magnitudes would become inf
# Scales keep 24 - 7 significant bits, so float32(q)·scale needs at most 24 bits for |q| <= 127:
# the product is exact in float32 (and in float64), on every platform.
SCALE_BITS = 17
_FLOAT32_TINIEST_EXPONENT = -149  # 2**-149 is the smallest float32 subnormal
# Indices travel as int32, which bounds the entries of one tensor.
MAX_TENSOR_ENTRIES = 2**31 - 1

_VALUE_DTYPES = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int8-channel": np.dtype(np.int8),
}


def check_encoding(encoding: str) -> str:
    """Return `encoding` if it is one of ENCODINGS.

    Raises:
        ValueError: naming the valid encodings.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; valid encodings are {list(ENCODINGS)}")
    return encoding


def check_topk(topk: float | None) -> float | None:
    """Return `topk` as a float if it is None or a fraction in (0, 1].

    Raises:
        ValueError: if it is not a number in (0, 1].
    """
    if topk is None:
        return None
    # bool is an int subclass; True is not a fraction.
    if isinstance(topk, bool) or not isinstance(topk, int | float):
        raise ValueError(f"topk must be a number in (0, 1] or None, got {topk!r}")
    if not 0 < topk <= 1:
        raise ValueError(f"topk must be in (0, 1], got {topk!r}")
    return float(topk)


def topk_count(size: int, topk: float) -> int:
    """Entries an encoder keeps of a tensor with `size` entries: ceil(topk·size), at least 1."""
    return min(size, max(1, math.ceil(topk * size)))


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-tensor int8: return (q with x's shape, scale of shape (1,)).

    `scale` is max|x| / 127 rounded up to SCALE_BITS significant bits (0 for an all-zero x)
    and q lies in [-127, 127], so `|x - q·scale| <= scale/2` for every entry, and the float32
    product q·scale is exact.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = _scale(float(np.max(np.abs(x), initial=0.0)))
    return _round_int8(x, scale), np.array([scale], dtype=np.float32)


def quantize_int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per index of axis 0 (an output row); per-tensor below 2-D.

    Returns:
        (q with x's shape, scale of shape (x.shape[0],) for ndim >= 2, else (1,)).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        return quantize_int8(x)
    rows = x.reshape(x.shape[0], -1)  # (rows, entries per row)
    scale = _scale(np.max(np.abs(rows), axis=1, initial=0.0))
    return _round_int8(rows, scale[:, None]).reshape(x.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of quantize_int8 / quantize_int8_rows: float32(q) times its row's (or the) scale."""
    q32 = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if q32.size == 0:
        return q32
    if scale.size == 1:
        return q32 * scale.reshape(())
    return (q32.reshape(scale.size, -1) * scale[:, None]).reshape(q32.shape)


def sparsify_topk(x: np.ndarray, topk: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the topk_count largest-magnitude entries of x.

    Ties are broken towards the lower flat index, so the choice is deterministic.

    Returns:
        (int32 flat row-major indices in increasing order, float32 values at those indices).
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if flat.size > MAX_TENSOR_ENTRIES:
        raise ValueError(f"a tensor of {flat.size} entries cannot be indexed with int32")
    if flat.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    keep = np.argsort(-np.abs(flat), kind="stable")[: topk_count(flat.size, topk)]
    indices = np.sort(keep).astype(np.int32)
    return indices, flat[indices]


def densify(indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of sparsify_topk: a float32 array of `shape`, zero except at `indices`."""
    out = np.zeros(math.prod(shape), dtype=np.float32)
    out[np.asarray(indices, dtype=np.int64)] = values
    return out.reshape(shape)


def encode_tensors(
    tensors: Mapping[str, np.ndarray], encoding: str = "fp32", topk: float | None = None
) -> TensorDict:
    """Turn an adapter into wire tensors (names and dtypes: docs/PROTOCOL.md, section 6).

    Args:
        tensors: canonical name -> floating-point array (cast to float32 first).
        encoding: one of ENCODINGS.
        topk: fraction of entries kept per tensor, or None to send every entry.

    Returns:
        The wire tensors; `decode_tensors(result, encoding, shapes)` restores the adapter, with
        `shapes` = each tensor's shape when topk is set and None otherwise.

    Raises:
        ValueError: for an unknown encoding, a bad topk, a name containing '#', a non-float
            tensor, non-finite values (allowed only for dense fp32, whose receiver rejects them),
            or values beyond the float16 range for fp16.
    """
    check_encoding(encoding)
    topk = check_topk(topk)
    wire: TensorDict = {}
    for name, array in tensors.items():
        x = _as_float32(name, array)
        if encoding == "fp32" and topk is None:
            wire[name] = x  # NaN passes through here on purpose: the receiver names the tensor
            continue
        if not np.all(np.isfinite(x)):
            raise ValueError(f"tensor {name!r} holds NaN or Inf, which {encoding} cannot carry")
        if topk is None:
            wire.update(_encode_dense(name, x, encoding))
        else:
            wire.update(_encode_sparse(name, x, encoding, topk))
    return wire


def decode_tensors(
    wire: Mapping[str, np.ndarray],
    encoding: str,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_dense_bytes: int | None = None,
) -> TensorDict:
    """Restore dense float32 tensors from wire tensors, checking that they are consistent.

    Args:
        wire: the tensors of a message body.
        encoding: one of ENCODINGS.
        shapes: for a top-k payload, each tensor's original shape (this also names the
            tensors); None for a dense payload, whose tensors carry their shapes.
        max_dense_bytes: if set, reject payloads whose dense float32 result would be larger
            (a few sparse indices must not make the receiver allocate gigabytes).

    Raises:
        ValueError: unknown encoding, missing or unexpected tensors, wrong dtypes, index, value
            and scale tensors of inconsistent lengths or shapes, indices out of range or not
            strictly increasing, negative or non-finite scales, or a result over the bound.
    """
    check_encoding(encoding)
    if shapes is None:
        names = sorted(n for n in wire if "#" not in n)
        dense_shapes = {n: tuple(wire[n].shape) for n in names}
    else:
        names = sorted(shapes)
        dense_shapes = {n: tuple(shapes[n]) for n in names}
    _check_names(wire, names, encoding, sparse=shapes is not None)
    if max_dense_bytes is not None:
        total = 4 * sum(math.prod(s) for s in dense_shapes.values())
        if total > max_dense_bytes:
            raise ValueError(f"decoded tensors would take {total} bytes, over {max_dense_bytes}")
    if shapes is None:
        return {n: _decode_dense(n, wire, encoding) for n in names}
    return {n: _decode_sparse(n, wire, encoding, dense_shapes[n]) for n in names}


def _round_up_scale(exact: np.ndarray) -> np.ndarray:
    # Round up to SCALE_BITS significant bits (and to float32's 2**-149 grid), in float64.
    _, exponent = np.frexp(exact)  # exact = f · 2**exponent with f in [0.5, 1), or 0
    quantum = np.ldexp(1.0, np.maximum(exponent - SCALE_BITS, _FLOAT32_TINIEST_EXPONENT))
    return np.ceil(exact / quantum) * quantum


def _largest_scale() -> float:
    # The largest SCALE_BITS-bit scale whose 127·scale is still finite, so no level decodes
    # to inf: float32's maximum / 127, rounded *down* to SCALE_BITS bits.
    exact = float(np.finfo(np.float32).max) / INT8_LEVELS
    quantum = 2.0 ** (int(np.frexp(exact)[1]) - SCALE_BITS)
    return math.floor(exact / quantum) * quantum


_MAX_SCALE = _largest_scale()


def _scale(max_abs: float | np.ndarray) -> np.ndarray:
    # max|x| / 127 rounded *up* to SCALE_BITS bits: 127·scale >= max|x|, so no entry clips,
    # |x - q·scale| <= scale/2 holds exactly, and q·scale is exact in float32. Re-encoding
    # decoded values then gives the same scale and levels back. (Capped where 127·scale
    # would overflow; the largest entries then clip by far less than scale/2.)
    m = np.asarray(max_abs, dtype=np.float64)
    scale = _round_up_scale(m / INT8_LEVELS)
    return np.minimum(scale, _MAX_SCALE).astype(np.float32)


def _round_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # A zero scale only occurs where every entry is 0; dividing by 1 there keeps q = 0.
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
    q = np.rint(x.astype(np.float64) / safe)
    # _scale makes |x / scale| <= 127 already; the clip guards scales that came from elsewhere.
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)


def _as_float32(name: str, array: np.ndarray) -> np.ndarray:
    if "#" in name:
        raise ValueError(f"tensor name {name!r} must not contain '#' (reserved for wire roles)")
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}, expected a float dtype")
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return np.asarray(array, dtype=np.float32, order="C")


def _check_fp16_range(name: str, x: np.ndarray) -> None:
    peak = float(np.max(np.abs(x), initial=0.0))
    if peak > FP16_MAX:
        raise ValueError(f"tensor {name!r} reaches {peak}, beyond float16's range ({FP16_MAX})")


def _encode_dense(name: str, x: np.ndarray, encoding: str) -> TensorDict:
    if encoding == "fp16":
        _check_fp16_range(name, x)
        return {name: x.astype(np.float16)}
    quantize = quantize_int8 if encoding == "int8" else quantize_int8_rows
    q, scale = quantize(x)
    return {name: q, name + SCALE_SUFFIX: scale}


def _row_length(shape: tuple[int, ...]) -> int:
    # max(1, ...) keeps the row division defined for tensors with no entries (and no indices).
    return max(1, math.prod(shape[1:]))


def _encode_sparse(name: str, x: np.ndarray, encoding: str, topk: float) -> TensorDict:
    indices, values = sparsify_topk(x, topk)
    wire = {name + INDICES_SUFFIX: indices}
    if encoding == "fp32":
        wire[name + VALUES_SUFFIX] = values
    elif encoding == "fp16":
        _check_fp16_range(name, values)
        wire[name + VALUES_SUFFIX] = values.astype(np.float16)
    elif encoding == "int8" or x.ndim < 2:
        q, scale = quantize_int8(values)
        wire.update({name + VALUES_SUFFIX: q, name + SCALE_SUFFIX: scale})
    else:  # int8-channel on >= 2-D: one scale per row, over that row's kept values only
        rows = indices // _row_length(x.shape)
        row_max = np.zeros(x.shape[0], dtype=np.float32)
        np.maximum.at(row_max, rows, np.abs(values))
        scale = _scale(row_max)
        wire[name + VALUES_SUFFIX] = _round_int8(values, scale[rows])
        wire[name + SCALE_SUFFIX] = scale
    return wire


def _check_names(
    wire: Mapping[str, np.ndarray], names: list[str], encoding: str, sparse: bool
) -> None:
    for name in names:
        if "#" in name:
            raise ValueError(f"tensor name {name!r} must not contain '#'")
    roles = [INDICES_SUFFIX, VALUES_SUFFIX] if sparse else [""]
    if encoding.startswith("int8"):
        roles.append(SCALE_SUFFIX)
    expected = {name + role for name in names for role in roles}
    if set(wire) != expected:
        missing, extra = sorted(expected - set(wire)), sorted(set(wire) - expected)
        raise ValueError(
            f"wire tensors do not fit encoding {encoding!r}"
            f"{' with topk' if sparse else ''}: missing {missing}, unexpected {extra}"
        )


def _expect(name: str, array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...] | None) -> None:
    if array.dtype != dtype:
        raise ValueError(f"wire tensor {name!r} has dtype {array.dtype}, expected {dtype}")
    if shape is not None and tuple(array.shape) != shape:
        raise ValueError(f"wire tensor {name!r} has shape {array.shape}, expected {shape}")


def _scale_shape(encoding: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if encoding == "int8-channel" and len(shape) >= 2 else (1,)


def _read_scale(name: str, wire: Mapping[str, np.ndarray], shape: tuple[int, ...],
                encoding: str) -> np.ndarray:
    scale = wire[name + SCALE_SUFFIX]
    _expect(name + SCALE_SUFFIX, scale, np.dtype(np.float32), _scale_shape(encoding, shape))
    if not (np.all(np.isfinite(scale)) and np.all(scale >= 0)):
        raise ValueError(f"wire tensor {name + SCALE_SUFFIX!r} must be finite and non-negative")
    return scale


def _decode_dense(name: str, wire: Mapping[str, np.ndarray], encoding: str) -> np.ndarray:
    values = wire[name]
    _expect(name, values, _VALUE_DTYPES[encoding], None)
    if encoding == "fp32":
        return values
    if encoding == "fp16":
        return values.astype(np.float32)
    return dequantize_int8(values, _read_scale(name, wire, tuple(values.shape), encoding))


def _decode_sparse(
    name: str, wire: Mapping[str, np.ndarray], encoding: str, shape: tuple[int, ...]
) -> np.ndarray:
    indices, values = wire[name + INDICES_SUFFIX], wire[name + VALUES_SUFFIX]
    _expect(name + INDICES_SUFFIX, indices, np.dtype(np.int32), None)
    _expect(name + VALUES_SUFFIX, values, _VALUE_DTYPES[encoding], None)
    if indices.ndim != 1 or values.shape != indices.shape:
        raise ValueError(
            f"tensor {name!r}: indices {indices.shape} and values {values.shape} must be "
            "1-D of the same length"
        )
    size = math.prod(shape)
    if indices.size and (indices[0] < 0 or indices[-1] >= size):
        raise ValueError(f"tensor {name!r}: indices out of range for shape {shape}")
    # Strictly increasing also rules out duplicates, whose last write would silently win.
    if np.any(np.diff(indices.astype(np.int64)) <= 0):
        raise ValueError(f"tensor {name!r}: indices must be strictly increasing")
    if encoding in ("fp32", "fp16"):
        return densify(indices, values.astype(np.float32), shape)
    scale = _read_scale(name, wire, shape, encoding)
    if scale.size == 1:
        dense_values = dequantize_int8(values, scale)
    else:  # per row: each kept entry uses the scale of the row its flat index falls in
        dense_values = values.astype(np.float32) * scale[indices // _row_length(shape)]
    return densify(indices, dense_values, shape)
