"""Client-level differential privacy for FedAvg: clip each client's delta, add Gaussian noise.

DP-FedAvg as in McMahan et al., "Learning Differentially Private Recurrent Language Models"
(ICLR 2018, arXiv 1710.06963): each client's update relative to the global is clipped to L2 norm
C, the clipped deltas are averaged with equal weight, and Gaussian noise of standard deviation
σ·C/n is added to the average. One client then changes the average by at most C/n, so σ is the
noise multiplier that `edgefl.privacy_accounting.epsilon` turns into an (ε, δ) guarantee.

Sample counts are ignored on purpose: weighting by self-reported counts would let one client's
influence exceed C/n and void the guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator.robust import clip_update
from aggregator.strategies import Strategy, WeightedAdapter
from protocol.tensors import TensorDict


def dp_fedavg(updates: Sequence[WeightedAdapter], reference: TensorDict, clip_norm: float,
              noise_multiplier: float, rng: np.random.Generator) -> TensorDict:
    """Reference + mean of the clipped deltas + N(0, (σ·C/n)²) per coordinate.

    Args:
        updates: (adapter, sample count) per client; the counts are not used (see module doc).
        reference: the global adapter the clients started the round from.
        clip_norm: C, the bound on each client's delta norm over all tensors together.
        noise_multiplier: σ ≥ 0; 0 gives clipped FedAvg without privacy.
        rng: the noise source (explicit, so runs are reproducible in tests).

    Returns:
        The new global adapter, float32.

    Raises:
        ValueError: no updates, C ≤ 0, σ < 0, or tensor names/shapes that differ.
    """
    if not updates:
        raise ValueError("dp_fedavg needs at least one update")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    n = len(updates)
    deltas = {k: np.zeros(v.shape, np.float64) for k, v in reference.items()}
    for adapter, _ in updates:
        clipped = clip_update(adapter, reference, clip_norm)  # checks C > 0 and the names
        for key, total in deltas.items():
            if clipped[key].shape != total.shape:
                raise ValueError(f"tensor {key!r}: shape {clipped[key].shape} != {total.shape}")
            total += clipped[key].astype(np.float64) - reference[key]
    std = noise_multiplier * clip_norm / n
    return {
        key: (reference[key] + total / n + rng.normal(0.0, std, total.shape)).astype(np.float32)
        for key, total in deltas.items()
    }


def dp_strategy(reference: TensorDict, clip_norm: float, noise_multiplier: float,
                rng: np.random.Generator) -> Strategy:
    """dp_fedavg bound to one round's global, with FedAvg's signature."""

    def aggregate(updates: Sequence[WeightedAdapter]) -> TensorDict:
        return dp_fedavg(updates, reference, clip_norm, noise_multiplier, rng)

    return aggregate
