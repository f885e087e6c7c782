"""Byzantine-robust aggregation: norm clipping, coordinate-wise median and trimmed mean.

Coordinate-wise median and trimmed mean follow Yin et al., "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates" (ICML 2018, arXiv 1803.01498); norm clipping of the
update relative to the global follows Sun et al., "Can You Really Backdoor Federated Learning?"
(arXiv 1911.07963). All are pure functions over named tensors with FedAvg's signature (the
trimmed mean once its β is bound, e.g. functools.partial(trimmed_mean, beta=0.2)).

Weights are sample counts that the devices themselves report, so a robust strategy ignores them
by default: an attacker could otherwise claim a huge count and buy the median. `weighted=True`
uses them when devices are trusted to report honestly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator.strategies import Strategy, WeightedAdapter
from protocol.tensors import TensorDict


def _stacked(updates: Sequence[WeightedAdapter]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each tensor stacked over clients (float64, shape (n, *shape)) and the weights (n,)."""
    if not updates:
        raise ValueError("robust aggregation needs at least one update")
    first = updates[0][0]
    for adapter, weight in updates:
        if not weight > 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if set(adapter) != set(first):
            raise ValueError(f"tensor names differ: {sorted(set(adapter) ^ set(first))}")
        for key, array in adapter.items():
            if array.shape != first[key].shape:
                raise ValueError(f"tensor {key!r}: shape {array.shape} != {first[key].shape}")
    stacks = {k: np.stack([a[k] for a, _ in updates]).astype(np.float64) for k in first}
    return stacks, np.array([float(w) for _, w in updates])


def _weighted_median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per coordinate, the value where the cumulative weight of the sorted values reaches half.

    When it reaches exactly half, the mean of that value and the next, so equal weights give
    np.median's answer.
    """
    order = np.argsort(stack, axis=0)
    values = np.take_along_axis(stack, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)  # (n, *shape)
    half = weights.sum() / 2
    tolerance = 1e-12 * weights.sum()
    index = np.argmax(cumulative >= half - tolerance, axis=0)[None]  # first index reaching half
    lower = np.take_along_axis(values, index, axis=0)[0]
    upper_index = np.minimum(index + 1, len(weights) - 1)
    upper = np.take_along_axis(values, upper_index, axis=0)[0]
    exactly_half = np.abs(np.take_along_axis(cumulative, index, axis=0)[0] - half) <= tolerance
    return np.where(exactly_half, (lower + upper) / 2, lower)


def fedmedian(updates: Sequence[WeightedAdapter], *, weighted: bool = False) -> TensorDict:
    """Coordinate-wise median of the clients' adapters.

    Robust to any values from fewer than half of the clients (by weight, if `weighted`).

    Args:
        updates: (adapter, sample count) per client.
        weighted: use the sample counts (weighted median) instead of one vote per client.

    Returns:
        The median adapter, float32.

    Raises:
        ValueError: no updates, a non-positive weight, or differing tensor names/shapes.
    """
    stacks, weights = _stacked(updates)
    if not weighted:
        return {k: np.median(s, axis=0).astype(np.float32) for k, s in stacks.items()}
    return {k: _weighted_median(s, weights).astype(np.float32) for k, s in stacks.items()}


def trim_count(beta: float, n: int) -> int:
    """⌊β·n⌋: how many values the β-trimmed mean drops at each end of n.

    Check a configuration up front with `trim_count(beta, min_clients) >= 1`: below that the
    trimmed mean would trim nothing and be the plain mean. β·n is rounded to 9 decimals first,
    so that 0.29·100 (28.999999999999996 in floating point) trims 29, not 28.

    Raises:
        ValueError: beta outside [0, 0.5) or n < 1.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return int(np.floor(round(beta * n, 9)))


def trimmed_mean(updates: Sequence[WeightedAdapter], beta: float, *,
                 weighted: bool = False) -> TensorDict:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018): per coordinate, drop the
    ⌊β·n⌋ largest and ⌊β·n⌋ smallest of the n values and average the rest.

    Args:
        updates: (adapter, sample count) per client.
        beta: fraction of clients trimmed at each end, in [0, 0.5); ⌊β·n⌋ must be at least 1.
        weighted: average the kept values by their clients' sample counts (which values are
            kept is decided by count, never by weight).

    Returns:
        The trimmed-mean adapter, float32.

    Raises:
        ValueError: beta outside [0, 0.5), ⌊β·n⌋ = 0 (nothing would be trimmed), no updates, a
            non-positive weight, or differing tensor names/shapes.
    """
    stacks, weights = _stacked(updates)
    n = len(weights)
    cut = trim_count(beta, n)
    if cut < 1:
        raise ValueError(f"trimmed mean with beta={beta} over n={n} updates would trim nothing "
                         f"(floor(beta*n) = 0): need beta*n >= 1")
    result = {}
    for key, stack in stacks.items():
        order = np.argsort(stack, axis=0)[cut : n - cut]  # indices of the kept values
        kept = np.take_along_axis(stack, order, axis=0)
        kept_weights = weights[order] if weighted else np.ones_like(kept)
        result[key] = ((kept * kept_weights).sum(axis=0) / kept_weights.sum(axis=0)).astype(
            np.float32)
    return result


def delta_norm(adapter: TensorDict, reference: TensorDict) -> float:
    """L2 norm of adapter - reference over all tensors together."""
    return float(np.sqrt(sum(
        float(np.sum((adapter[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)))


def clip_update(adapter: TensorDict, reference: TensorDict, max_norm: float) -> TensorDict:
    """Scale adapter - reference down to L2 norm ≤ `max_norm` (unchanged if already within).

    Raises:
        ValueError: max_norm is not positive, or the tensor names differ.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if set(adapter) != set(reference):
        raise ValueError(f"tensor names differ: {sorted(set(adapter) ^ set(reference))}")
    norm = delta_norm(adapter, reference)
    if norm <= max_norm:
        return {k: v.copy() for k, v in adapter.items()}
    scale = max_norm / norm
    return {k: (reference[k] + (adapter[k].astype(np.float64) - reference[k]) * scale).astype(
        adapter[k].dtype) for k in adapter}


def clip_updates(updates: Sequence[WeightedAdapter], reference: TensorDict,
                 max_norm: float) -> list[WeightedAdapter]:
    """clip_update applied to every client, weights unchanged."""
    return [(clip_update(adapter, reference, max_norm), weight) for adapter, weight in updates]


def clipped(strategy: Strategy, reference: TensorDict, max_norm: float) -> Strategy:
    """A strategy that first clips every update's distance from `reference` (the global).

    A round's strategy is built with that round's global, e.g.
    `clipped(trimmed_mean, global_adapter, 1.0)(updates)`.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    def aggregate(updates: Sequence[WeightedAdapter]) -> TensorDict:
        return strategy(clip_updates(updates, reference, max_norm))

    return aggregate
