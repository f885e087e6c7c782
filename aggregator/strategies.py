"""Aggregation strategies: pure functions over named tensors (no I/O, no clocks, no globals).

FLORA (Nguyen et al., arXiv 2404.15182) aggregates LoRA by FedAvg weighted by client sample
counts, averaging A and B separately (FedIT-style) -- which is *not* the average of the products
B·A; the exact-aggregation strategy corrects that with a residual.

Every FedAvg-style strategy is built on WeightedSum, which can be merged, so partial aggregates
from several gateway workers combine exactly (device -> gateway -> upstream aggregator). Which
name selects which family of round aggregators is decided in aggregator/registry.py only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.tensors import TensorDict

WeightedAdapter = tuple[TensorDict, float]


@dataclass(frozen=True, slots=True)
class WeightedSum:
    """Σ w_k·x_k per tensor (float64, so long sums do not drift) and Σ w_k."""

    sums: dict[str, np.ndarray]
    weight: float
    count: int


def accumulate(acc: WeightedSum | None, adapter: TensorDict, weight: float) -> WeightedSum:
    """Return acc + weight·adapter (a new WeightedSum; the inputs are not modified)."""
    if not weight > 0:
        raise ValueError(f"aggregation weight must be positive, got {weight}")
    if acc is None:
        return WeightedSum({k: v.astype(np.float64) * weight for k, v in adapter.items()},
                           float(weight), 1)
    _check_same_keys(acc.sums, adapter)
    return WeightedSum(
        {k: acc.sums[k] + adapter[k].astype(np.float64) * weight for k in acc.sums},
        acc.weight + float(weight), acc.count + 1,
    )


def merge(a: WeightedSum, b: WeightedSum) -> WeightedSum:
    """Combine two partial sums, as an upstream aggregator does with its gateways' results."""
    _check_same_keys(a.sums, b.sums)
    return WeightedSum({k: a.sums[k] + b.sums[k] for k in a.sums}, a.weight + b.weight,
                       a.count + b.count)


def weighted_mean(acc: WeightedSum) -> TensorDict:
    """Σ w_k·x_k / Σ w_k, as float32."""
    return {k: (v / acc.weight).astype(np.float32) for k, v in acc.sums.items()}


def fedavg(updates: Sequence[WeightedAdapter]) -> TensorDict:
    """FLORA / FedAvg: average each tensor weighted by the clients' sample counts.

    Note: averages LoRA A and B factors independently, not their product.

    Raises:
        ValueError: no updates, a non-positive weight, or differing tensor names/shapes.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    acc: WeightedSum | None = None
    for adapter, weight in updates:
        acc = accumulate(acc, adapter, weight)
    assert acc is not None
    return weighted_mean(acc)


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial discount 1/sqrt(1 + s) for an update `s` versions old."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / float(np.sqrt(1.0 + staleness))


def delta(adapter: TensorDict, base: TensorDict) -> TensorDict:
    """adapter - base, per tensor: what a device changed from the global it started from."""
    _check_same_keys(base, adapter)
    return {k: adapter[k] - base[k] for k in base}


def add(base: TensorDict, change: TensorDict) -> TensorDict:
    """base + change, per tensor: a full adapter from a device's delta."""
    _check_same_keys(base, change)
    return {k: (base[k] + change[k]).astype(np.float32) for k in base}


def fedbuff_step(global_adapter: TensorDict, buffered: Sequence[tuple[TensorDict, int]],
                 server_lr: float) -> TensorDict:
    """FedBuff's server step (Nguyen et al., AISTATS 2022, arXiv 2106.06639, Algorithm 1).

    With K = len(buffered) client deltas Δ_k, each τ_k versions stale:

        x ← x + η_g · (Σ_k s(τ_k)·Δ_k) / K,   s(τ) = 1/sqrt(1 + τ)  (staleness_weight)

    The division is by K, not by Σ_k s(τ_k): a buffer of stale updates moves the global less
    than a buffer of fresh ones. No sample-count weights, as in the paper. Δ is a device's
    adapter minus the global it started from, so the step adds it.

    The sum can be streamed: accumulate(acc, Δ_k, staleness_weight(τ_k)) over the buffer gives
    acc.sums = Σ_k s(τ_k)·Δ_k and acc.count = K.

    Args:
        global_adapter: the current global x.
        buffered: (delta, staleness) per buffered client update, staleness ≥ 0.
        server_lr: η_g > 0.

    Returns:
        The new global, float32.

    Raises:
        ValueError: an empty buffer, η_g not a positive finite number, a negative staleness, or
            tensor names/shapes that differ from the global's.
    """
    if not buffered:
        raise ValueError("fedbuff_step needs at least one buffered update")
    if not (np.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be a positive finite number, got {server_lr}")
    acc: WeightedSum | None = None
    for change, staleness in buffered:
        _check_same_keys(global_adapter, change)
        acc = accumulate(acc, change, staleness_weight(staleness))
    assert acc is not None
    return {k: (global_adapter[k].astype(np.float64) + server_lr * acc.sums[k] / acc.count
                ).astype(np.float32) for k in global_adapter}


def _check_same_keys(a: dict[str, np.ndarray], b: TensorDict) -> None:
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))}")
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"tensor {key!r}: shape {b[key].shape} != {a[key].shape}")


Strategy = Callable[[Sequence[WeightedAdapter]], TensorDict]
