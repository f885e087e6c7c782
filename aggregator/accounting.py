"""Privacy budget of client-level DP-FedAvg without subsampling, by Rényi DP (stdlib only).

Each round releases start + (Σ clipped deltas + N(0, (σC)²)) / W (aggregator.privacy.dp_step):
a Gaussian mechanism whose noise is σ times its sensitivity C/W (one device added or removed).
By Mironov, "Rényi Differential Privacy" (CSF 2017, arXiv 1702.07476), Proposition 7, it is
(α, α/(2σ²))-RDP at every order α, and RDP composes additively over adaptively chosen rounds
(Proposition 1), so T rounds are (α, T·α/(2σ²))-RDP.

No amplification by subsampling is claimed: devices join a round first-come, not sampled by the
server at random, so the sample rate is 1. (McMahan et al. 2018 account with a sample rate q < 1
only because their server samples users independently.)

RDP becomes (ε, δ)-DP with the conversion of Balle, Barthe, Gaboardi, Hsu and Sato, "Hypothesis
Testing Interpretations and Rényi Differential Privacy" (AISTATS 2020, arXiv 1905.09982),
Theorem 21, the one Opacus' RDP accountant uses:

    ε = min over α of  rdp(α) + log((α − 1)/α) − (log δ + log α)/(α − 1),

over the same orders as Opacus by default, so results match `RDPAccountant` at sample_rate=1.
The gateway has no torch, hence no Opacus: this module needs the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Opacus' RDPAccountant.DEFAULT_ALPHAS: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                          + [float(a) for a in range(12, 64)])


def _check_sigma(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def gaussian_rdp(noise_multiplier: float, order: float) -> float:
    """α/(2σ²): Rényi DP at order α of the Gaussian mechanism, sensitivity 1, noise N(0, σ²).

    Mironov 2017 (arXiv 1702.07476), Proposition 7.

    Args:
        noise_multiplier: σ ≥ 0, the noise standard deviation in units of the sensitivity.
        order: α ≥ 1 (α = 1 is the KL divergence).

    Returns:
        α/(2σ²); inf for σ = 0.

    Raises:
        ValueError: σ or α out of range.
    """
    _check_sigma(noise_multiplier)
    if not (math.isfinite(order) and order >= 1):
        raise ValueError(f"order must be a finite number >= 1, got {order}")
    if noise_multiplier == 0:
        return math.inf
    return order / (2 * noise_multiplier ** 2)


def _epsilon_at(rdp: float, order: float, delta: float) -> float:
    """Balle et al. 2020, Theorem 21: (α, rdp)-RDP implies (ε, δ)-DP with this ε."""
    return rdp + math.log((order - 1) / order) - (math.log(delta) + math.log(order)) / (order - 1)


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(a) for a in orders)
    if not checked or not all(math.isfinite(a) and a > 1 for a in checked):
        raise ValueError(f"orders must be a non-empty list of finite numbers > 1, got {orders!r}")
    return checked


def epsilon(noise_multiplier: float, rounds: int, delta: float,
            orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """ε after `rounds` rounds of DP-FedAvg at noise multiplier σ, at the given δ, no subsampling.

    T adaptive compositions of the Gaussian mechanism are (α, T·α/(2σ²))-RDP (Mironov 2017,
    Propositions 1 and 7), converted to (ε, δ) by Balle et al. 2020, Theorem 21, minimised over
    `orders`. Equal to Opacus' RDPAccountant with history [(σ, 1.0, rounds)] on the same orders
    (except that a negative bound, possible only for δ near 1, is reported as 0).

    Args:
        noise_multiplier: σ ≥ 0, the noise standard deviation in units of the sensitivity C/W.
        rounds: T ≥ 0, how many rounds were (or will be) released.
        delta: δ in (0, 1); take it well below 1 / number of devices.
        orders: the RDP orders α > 1 to minimise over.

    Returns:
        ε ≥ 0: 0 for no rounds, inf for σ = 0.

    Raises:
        ValueError: arguments out of range.
    """
    _check_sigma(noise_multiplier)
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds}")
    _check_delta(delta)
    checked = _check_orders(orders)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    best = min(_epsilon_at(int(rounds) * gaussian_rdp(noise_multiplier, a), a, delta)
               for a in checked)
    return max(best, 0.0)


def rounds_within(noise_multiplier: float, max_epsilon: float, delta: float,
                  orders: Sequence[float] = DEFAULT_ORDERS) -> int:
    """The most rounds T with epsilon(σ, T, δ) ≤ max_epsilon (0 if not even one round fits).

    ε(T) ≤ E iff some order α has T·α/(2σ²) + log((α−1)/α) − (log δ + log α)/(α−1) ≤ E, so T is
    the largest of the per-order bounds; it is then adjusted by evaluating `epsilon` so that the
    answer agrees with it exactly despite rounding.

    Args:
        noise_multiplier: σ ≥ 0 (σ = 0 allows no round).
        max_epsilon: the budget E, a finite number ≥ 0.
        delta: δ in (0, 1).
        orders: the RDP orders α > 1, as for `epsilon`.

    Returns:
        The number of rounds.

    Raises:
        ValueError: arguments out of range.
    """
    _check_sigma(noise_multiplier)
    if not (math.isfinite(max_epsilon) and max_epsilon >= 0):
        raise ValueError(f"max_epsilon must be a finite number >= 0, got {max_epsilon}")
    _check_delta(delta)
    checked = _check_orders(orders)
    if noise_multiplier == 0:
        return 0
    candidates = [math.floor((max_epsilon - _epsilon_at(0.0, a, delta))
                             / gaussian_rdp(noise_multiplier, a)) for a in checked]
    rounds = max(0, max(candidates))
    while epsilon(noise_multiplier, rounds + 1, delta, checked) <= max_epsilon:
        rounds += 1
    while rounds > 0 and epsilon(noise_multiplier, rounds, delta, checked) > max_epsilon:
        rounds -= 1
    return rounds
