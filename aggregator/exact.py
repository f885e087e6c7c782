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
weight of each LoRA layer, `scaling` being its LoRA scale (α/r in peft). Residuals of several
rounds concatenate, so a device that skipped rounds catches up with one merged residual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies import WeightedAdapter, fedavg
from protocol.tensors import TensorDict

Factors = tuple[np.ndarray, np.ndarray]  # (U (d_out, q), V (q, d_in)): the residual is U @ V
Residual = dict[str, Factors]  # LoRA layer prefix ("fc1") -> factors
ResidualLog = Mapping[int, Residual]  # round -> the residual that round produced

_A, _B = ".lora_A.weight", ".lora_B.weight"
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
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if u64.shape[1] != v64.shape[0]:
        raise ValueError(f"factor shapes {u64.shape} and {v64.shape} do not multiply")
    if u64.shape[1] == 0:
        return u64.astype(np.float32), v64.astype(np.float32)
    # U V = Qu (Ru Rvᵀ) Qvᵀ, and Ru Rvᵀ is only q×q: its SVD is cheap however large d is.
    qu, ru = np.linalg.qr(u64)
    qv, rv = np.linalg.qr(v64.T)
    left, sigma, right = np.linalg.svd(ru @ rv.T)
    keep = int(np.sum(sigma > max(rtol * sigma[0], atol))) if sigma.size else 0
    if max_rank is not None:
        keep = min(keep, max_rank)
    root = np.sqrt(sigma[:keep])
    return ((qu @ left[:, :keep]) * root).astype(np.float32), \
        (root[:, None] * (right[:keep] @ qv.T)).astype(np.float32)


def merge_residuals(residuals: Sequence[Residual], max_rank: int | None = None) -> Residual:
    """Sum several residuals (for example of consecutive rounds) as one factored residual.

    Factors concatenate (Σ U_i V_i = [U_1 … U_m][V_1; …; V_m]); the result is re-compacted when
    its rank exceeds `max_rank`, by default min(d_out, d_in), beyond which factors would cost
    more than the dense matrix.
    """
    layers = sorted({layer for r in residuals for layer in r})
    out: Residual = {}
    for layer in layers:
        parts = [r[layer] for r in residuals if layer in r]
        u = np.concatenate([p[0] for p in parts], axis=1)
        v = np.concatenate([p[1] for p in parts], axis=0)
        limit = min(u.shape[0], v.shape[1]) if max_rank is None else max_rank
        out[layer] = compact(u, v, max_rank=limit) if u.shape[1] > limit else (u, v)
    return out


def residual_since(
    log: ResidualLog, after_round: int, upto_round: int, max_rank: int | None = None
) -> Residual:
    """The merged residual of rounds after_round < t ≤ upto_round: a device's catch-up.

    A device whose frozen weights include every residual up to `after_round` adds this one to be
    level with the server at `upto_round`. Rounds missing from the log contributed nothing.
    """
    if after_round > upto_round:
        raise ValueError(f"after_round {after_round} is past upto_round {upto_round}")
    return merge_residuals(
        [log[t] for t in sorted(log) if after_round < t <= upto_round], max_rank=max_rank
    )


def dense(factors: Factors) -> np.ndarray:
    """U @ V as a dense float64 matrix (for devices folding it in, and for tests)."""
    u, v = factors
    return np.asarray(u, np.float64) @ np.asarray(v, np.float64)


def residual_nbytes(res: Residual) -> int:
    """Bytes of the factors as sent (float32), without codec overhead."""
    return sum(u.nbytes + v.nbytes for u, v in res.values())
