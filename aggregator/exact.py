"""Exact LoRA aggregation: the FedAvg residual Σp_k B_k A_k − B̄Ā, kept in factored low-rank form.

FedEx-LoRA (Singhal, Ponkshe, Vepakomma, arXiv 2410.09432) folds the residual between the average
of the clients' products and the product of the averaged factors into the frozen weight, so the
global model is the exact weighted mean of the client models. Fed-TaLoRA's post-aggregation
calibration (Yu, Hu, Min, arXiv 2505.12318) is read as the same residual (ALGORITHMS.md §1, a
reconstruction). Unlike the FedEx-LoRA code, the residual is never a dense d_out×d_in matrix here:

    R = Σ_k p_k (B_k − B̄)(A_k − Ā) = U @ V,
    U = [B_1−B̄ … B_K−B̄] (d_out, K·r),  V = [p_1(A_1−Ā); …; p_K(A_K−Ā)] (K·r, d_in)

which equals Σp_k B_k A_k − B̄Ā because Σp_k = 1, and has rank ≤ (K−1)·r (the weighted blocks of U sum
to zero), below the (K+1)·r of the uncentred form. A device adds `scaling · U @ V` to the frozen
weight of each LoRA layer, `scaling` being its LoRA scale (α/r in peft).

The gateway keeps one cumulative residual R_t (scaled: in weight units) exactly: each round
`accumulate_exact` adds the round's residual, re-factored exactly through a thin SVD, and keeps
a layer dense once its rank passes `crossover_rank` (beyond which factors cost more than the
matrix). Each global carries only the round's step R_t − R_(t−1), of rank ≤ (K−1)·r whatever
t is; a device level with the previous round adds it, any other device fetches the retained
catch-up copy of R_t (`catch_up_copy`), which is R_t itself when it fits the payload limit and
otherwise its best approximation at the rank `rank_caps` allows, with the error reported.
`residual_tensors` / `residual_from_tensors` convert factors to and from wire tensors
(protocol.residual).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies import WeightedAdapter, fedavg
from protocol.codec import MAX_PAYLOAD_BYTES
from protocol.residual import DENSE, dense_residual, residual_layers
from protocol.tensors import TensorDict

Factors = tuple[np.ndarray, np.ndarray]  # (U (d_out, q), V (q, d_in)): the residual is U @ V
Residual = dict[str, Factors]  # LoRA layer prefix ("fc1") -> factors

_A, _B = ".lora_A.weight", ".lora_B.weight"
_U, _V = ".U", ".V"  # wire names of a layer's residual factors (GlobalModel.base_residual)
_FLOAT32_BYTES = 4
# Singular values below this fraction of the largest are numerical noise of an exactly
# lower-rank product (float64 has ~1e-16 relative precision; 1e-10 leaves a wide margin).
RANK_RTOL = 1e-10


def lora_layers(adapter: TensorDict) -> list[str]:
    """Sorted prefixes of the layers holding both `<prefix>.lora_A.weight` and `.lora_B.weight`."""
    prefixes = (k[: -len(_A)] for k in adapter if k.endswith(_A))
    return sorted(p for p in prefixes if p + _B in adapter)


def residual(updates: Sequence[WeightedAdapter], rtol: float = RANK_RTOL) -> Residual:
    """Per LoRA layer, the factored residual R = Σp_k B_k A_k − B̄Ā with p_k = w_k / Σw.

    The factors are compacted to R's numerical rank, so one update gives rank-0 factors.

    Args:
        updates: (adapter, weight) pairs with the same tensor names and shapes.
        rtol: relative singular-value threshold below which directions are dropped as noise.

    Returns:
        layer prefix -> (U, V) in float32 with U @ V = R.

    Raises:
        ValueError: no updates, a non-positive weight, or an adapter without LoRA layers.
    """
    if not updates:
        raise ValueError("residual needs at least one update")
    weights = np.array([w for _, w in updates], dtype=np.float64)
    if not np.all(weights > 0):
        raise ValueError(f"aggregation weights must be positive, got {weights.tolist()}")
    p = weights / weights.sum()
    layers = lora_layers(updates[0][0])
    if not layers:
        raise ValueError("the adapters hold no lora_A/lora_B pairs")
    out: Residual = {}
    for layer in layers:
        a = np.stack([u[layer + _A] for u, _ in updates]).astype(np.float64)  # (K, r, d_in)
        b = np.stack([u[layer + _B] for u, _ in updates]).astype(np.float64)  # (K, d_out, r)
        a_bar = np.tensordot(p, a, axes=1)
        b_bar = np.tensordot(p, b, axes=1)
        u_f = np.concatenate(list(b - b_bar), axis=1)  # (d_out, K·r)
        v_f = np.concatenate(list((a - a_bar) * p[:, None, None]), axis=0)  # (K·r, d_in)
        # Cancellation leaves noise of the size of the products, not of R: an absolute floor
        # keeps identical updates at rank 0.
        sizes = np.linalg.norm(b, axis=(1, 2)) * np.linalg.norm(a, axis=(1, 2))
        floor = rtol * float(np.max(sizes))
        out[layer] = compact(u_f, v_f, rtol=rtol, atol=floor)
    return out


def exact_aggregate(updates: Sequence[WeightedAdapter]) -> tuple[TensorDict, Residual]:
    """FedEx-LoRA step: the FedAvg adapter and the residual to fold into the frozen weights.

    After a device adds `scaling · U @ V` to each layer's frozen weight W0 and loads the returned
    adapter, its model W0 + scaling·(R + B̄Ā) is the weighted mean of the client models.
    Non-LoRA tensors (a trained head) are averaged plainly, which is already exact.
    """
    return fedavg(updates), residual(updates)


def compact(
    u: np.ndarray, v: np.ndarray, max_rank: int | None = None, rtol: float = RANK_RTOL,
    atol: float = 0.0,
) -> Factors:
    """Re-factor U @ V through a thin SVD, keeping at most `max_rank` directions.

    Exact (to `rtol`) when `max_rank` is None or at least the numerical rank; otherwise it is the
    best rank-`max_rank` approximation in Frobenius norm. Singular values at or below
    max(rtol·σ_max, atol) are dropped. They are split evenly between the two factors so neither
    grows large.

    Returns:
        (U', V') in float32, U' (d_out, q'), V' (q', d_in), q' ≤ min(d_out, d_in, q).
    """
    factors, _, _ = _compact(u, v, max_rank, rtol, atol)
    return factors


def _compact(
    u: np.ndarray, v: np.ndarray, max_rank: int | None, rtol: float, atol: float
) -> tuple[Factors, np.ndarray, np.ndarray]:
    """compact, also returning the kept singular values and those `max_rank` cut off.

    Singular values dropped as numerical noise (at or below max(rtol·σ_max, atol)) are in
    neither array: ‖U V − U' V'‖_F is the norm of the second array (up to that noise).
    """
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if u64.ndim != 2 or v64.ndim != 2 or u64.shape[1] != v64.shape[0]:
        raise ValueError(f"factor shapes {u64.shape} and {v64.shape} do not multiply")
    if u64.shape[1] == 0:
        return (u64.astype(np.float32), v64.astype(np.float32)), np.zeros(0), np.zeros(0)
    # U V = Qu (Ru Rvᵀ) Qvᵀ, and Ru Rvᵀ is only q×q: its SVD is cheap however large d is.
    qu, ru = np.linalg.qr(u64)
    qv, rv = np.linalg.qr(v64.T)
    left, sigma, right = np.linalg.svd(ru @ rv.T)
    rank = int(np.sum(sigma > max(rtol * sigma[0], atol))) if sigma.size else 0
    keep = rank if max_rank is None else min(rank, max_rank)
    root = np.sqrt(sigma[:keep])
    factors = ((qu @ left[:, :keep]) * root).astype(np.float32), \
        (root[:, None] * (right[:keep] @ qv.T)).astype(np.float32)
    return factors, sigma[:keep], sigma[keep:rank]


def crossover_rank(d_out: int, d_in: int) -> int:
    """floor(d_out·d_in / (d_out + d_in)): above this rank, factors cost more than the dense matrix.

    Rank-q factors hold q·(d_out + d_in) numbers, the dense matrix d_out·d_in.

    Raises:
        ValueError: a dimension that is not positive.
    """
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"layer dimensions must be positive, got ({d_out}, {d_in})")
    return (d_out * d_in) // (d_out + d_in)


def rank_budget(
    shapes: Mapping[str, tuple[int, int]], reserved_bytes: int, limit_bytes: int
) -> int:
    """The largest uniform residual rank q whose float32 factors fit in a payload.

    q is the largest with Σ_layers 4·q·(d_out + d_in) + reserved_bytes ≤ limit_bytes, capped at
    the smallest crossover_rank of the layers (past it, a layer's factors outgrow its dense
    matrix).

    Args:
        shapes: LoRA layer -> (d_out, d_in) of its frozen weight.
        reserved_bytes: the rest of the payload (the adapter, plus any codec overhead the caller
            wants to leave room for).
        limit_bytes: the payload limit (protocol.codec.MAX_PAYLOAD_BYTES for a global).

    Raises:
        ValueError: no layers, a non-positive dimension, or reserved_bytes over the limit.
    """
    return min(rank_caps(shapes, reserved_bytes, limit_bytes).values())


def rank_caps(
    shapes: Mapping[str, tuple[int, int]], reserved_bytes: int, limit_bytes: int
) -> dict[str, int]:
    """Per layer, the rank its residual is kept at: min(its crossover_rank, the payload rank).

    The payload rank is the largest q with Σ_layers 4·q·(d_out + d_in) + reserved_bytes ≤
    limit_bytes, so the factors of all layers together fit even when every layer reaches it; a
    layer whose factors would outgrow its dense matrix first stops at its own crossover.

    Raises:
        ValueError: no layers, a non-positive dimension, or reserved_bytes over the limit.
    """
    if not shapes:
        raise ValueError("rank_budget needs at least one layer shape")
    if reserved_bytes > limit_bytes:
        raise ValueError(f"the {reserved_bytes} reserved bytes alone exceed the "
                         f"{limit_bytes}-byte limit: no residual rank fits")
    per_rank = _FLOAT32_BYTES * sum(d_out + d_in for d_out, d_in in shapes.values())
    payload = (limit_bytes - reserved_bytes) // per_rank
    return {layer: min(crossover_rank(d_out, d_in), payload)
            for layer, (d_out, d_in) in shapes.items()}


def _shape(factors: Factors) -> tuple[int, int]:
    return factors[0].shape[0], factors[1].shape[1]


def residual_tensors(res: Residual) -> TensorDict:
    """The wire form of a residual: `<layer>.U` and `<layer>.V` (float32), as in base_residual."""
    return {layer + suffix: np.asarray(factor, np.float32)
            for layer, (u, v) in res.items() for suffix, factor in ((_U, u), (_V, v))}


def residual_from_tensors(t: TensorDict) -> Residual:
    """Inverse of residual_tensors.

    Raises:
        ValueError: a name not ending in `.U`/`.V`, a U without its V (or the reverse), or factors
            that are not 2-d or do not multiply.
    """
    out: Residual = {}
    for name in t:
        if not name.endswith((_U, _V)) or len(name) <= 2:
            raise ValueError(f"residual tensor {name!r} is neither <layer>.U nor <layer>.V")
    for name in sorted(n for n in t if n.endswith(_U)):
        layer = name[: -len(_U)]
        if layer + _V not in t:
            raise ValueError(f"residual factor {name!r} has no {layer + _V!r}")
        u, v = t[name], t[layer + _V]
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"residual factors of {layer!r} have shapes {u.shape} and {v.shape}, "
                             "which do not multiply")
        out[layer] = (u, v)
    orphans = sorted(n for n in t if n.endswith(_V) and n[: -len(_V)] not in out)
    if orphans:
        raise ValueError(f"residual factors {orphans} have no matching .U")
    return out


def scaled(res: Residual, scaling: Mapping[str, float]) -> Residual:
    """The residual in weight units: each layer's U multiplied by its LoRA scaling (α/r).

    Raises:
        ValueError: a layer without a scaling.
    """
    missing = sorted(set(res) - set(scaling))
    if missing:
        raise ValueError(f"no LoRA scaling for residual layers {missing}")
    return {layer: ((np.asarray(u, np.float64) * scaling[layer]).astype(np.float32), v)
            for layer, (u, v) in res.items()}


def dense(factors: Factors) -> np.ndarray:
    """U @ V as a dense float64 matrix (for devices folding it in, and for tests)."""
    u, v = factors
    return np.asarray(u, np.float64) @ np.asarray(v, np.float64)


def residual_nbytes(res: Residual) -> int:
    """Bytes of the factors as sent (float32), without codec overhead."""
    return sum(u.nbytes + v.nbytes for u, v in res.values())


# -- the gateway's residual ledger: exact R_t, per-round steps, catch-up copies ---------------
def accumulate_exact(cumulative: TensorDict, increment: Residual) -> TensorDict:
    """R_t = R_(t−1) + increment, exactly, in wire form (protocol.residual): per layer the
    factors `<layer>.U`/`.V` while their rank is at most the layer's crossover_rank, else the
    matrix `<layer>.dense` (which costs no more than factors past that rank). Never truncated:
    devices that add every round's increment hold exactly this.

    Raises:
        ValueError: malformed cumulative tensors, or layer shapes that differ between sides.
    """
    out: TensorDict = {}
    for layer in sorted(set(residual_layers(cumulative)) | set(increment)):
        step = increment.get(layer)
        if layer + DENSE in cumulative:
            matrix = np.asarray(cumulative[layer + DENSE], np.float64)
            if step is not None:
                matrix = matrix + dense(step)
            out[layer + DENSE] = matrix.astype(np.float32)
            continue
        parts = [(cumulative[layer + _U], cumulative[layer + _V])] if layer + _U in cumulative \
            else []
        parts += [step] if step is not None else []
        if len({_shape(p) for p in parts}) > 1:
            raise ValueError(f"layer {layer!r}: residual shapes {[_shape(p) for p in parts]}")
        u = np.concatenate([np.asarray(p[0], np.float64) for p in parts], axis=1)
        v = np.concatenate([np.asarray(p[1], np.float64) for p in parts], axis=0)
        floor = RANK_RTOL * max(float(np.linalg.norm(pu) * np.linalg.norm(pv)) for pu, pv in parts)
        (cu, cv), kept, _ = _compact(u, v, None, RANK_RTOL, floor)
        if kept.size > crossover_rank(u.shape[0], v.shape[1]):
            out[layer + DENSE] = (u @ v).astype(np.float32)
        else:
            out[layer + _U], out[layer + _V] = cu, cv
    return out


def catch_up(cumulative: TensorDict, reserved_bytes: int, limit_bytes: int
             ) -> tuple[TensorDict, float]:
    """What a device that is not level with the last round receives: R_t itself when it fits
    beside `reserved_bytes` within `limit_bytes`, else per layer its best approximation at the
    rank rank_caps allows, with ‖R_t − sent‖_F / ‖R_t‖_F (0.0 when exact).
    """
    sent = sum(np.asarray(v).size * _FLOAT32_BYTES for v in cumulative.values())
    if sent + reserved_bytes <= limit_bytes:
        return dict(cumulative), 0.0
    shapes = {layer: tuple(m.shape) for layer, m in dense_residual(cumulative).items()}
    caps = rank_caps(shapes, reserved_bytes, limit_bytes)  # type: ignore[arg-type]
    out: TensorDict = {}
    kept_sq = dropped_sq = 0.0
    for layer in residual_layers(cumulative):
        if layer + DENSE in cumulative:
            matrix = cumulative[layer + DENSE]
            u, v = matrix, np.eye(matrix.shape[1])
        else:
            u, v = cumulative[layer + _U], cumulative[layer + _V]
        (out[layer + _U], out[layer + _V]), kept, dropped = _compact(u, v, caps[layer],
                                                                       RANK_RTOL, 0.0)
        kept_sq += float(np.sum(kept**2))
        dropped_sq += float(np.sum(dropped**2))
    total = kept_sq + dropped_sq
    return out, (float(np.sqrt(dropped_sq / total)) if dropped_sq > 0 else 0.0)


# Room kept free in a catch-up message for its header and framing.
CATCH_UP_OVERHEAD_BYTES = 64 * 1024


def catch_up_copy(cumulative: TensorDict) -> tuple[TensorDict, float]:
    """catch_up within the protocol's payload limit: the residual topic's tensors and error."""
    return catch_up(cumulative, CATCH_UP_OVERHEAD_BYTES, MAX_PAYLOAD_BYTES)


def ledger_rank(cumulative: TensorDict) -> int:
    """The largest rank among the layers of a wire-form residual; a dense layer (kept dense
    because its rank passed the crossover) counts as min(d_out, d_in), an upper bound."""
    ranks = [min(cumulative[layer + DENSE].shape) if layer + DENSE in cumulative
             else cumulative[layer + _U].shape[1] for layer in residual_layers(cumulative)]
    return max(ranks, default=0)


def residual_ratio(residual: Mapping[str, np.ndarray], adapter: TensorDict,
                   scaling: Mapping[str, float]) -> float:
    """‖R‖ / ‖s·B̄Ā‖ over all layers (Frobenius): how much exact aggregation adds to FedAvg.

    Args:
        residual: Per layer, the dense residual R folded into the frozen weight.
        adapter: The global adapter (its `<layer>.lora_A.weight` / `.lora_B.weight` factors).
        scaling: Per layer, the LoRA scaling s = α/r.
    """
    residual_sq = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in residual.values())
    product_sq = 0.0
    for layer in lora_layers(adapter):
        b, a = adapter[layer + _B].astype(np.float64), adapter[layer + _A].astype(np.float64)
        product_sq += float(np.sum(np.square(scaling[layer] * (b @ a))))
    return math.sqrt(residual_sq / product_sq) if product_sq > 0 else math.inf
