"""Privacy budget of client-level DP-FedAvg: ε for (σ, sampling rate, rounds, δ) by Opacus' RDP.

Each round samples every device with probability `sample_rate` (clients per round / fleet size)
and applies the Gaussian mechanism with noise multiplier σ (aggregator.privacy.dp_fedavg); the
subsampled-Gaussian RDP bound of Mironov et al. (arXiv 1908.10530), composed over the rounds,
gives ε at the chosen δ. Opacus imports torch, so it is imported only when a function runs: the
gateway image (no torch) can import this module.
"""

from __future__ import annotations

import warnings


def _check(sample_rate: float, rounds: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε of `rounds` rounds of DP-FedAvg at noise multiplier σ, for the given δ.

    Args:
        noise_multiplier: σ, the noise standard deviation in units of the clip norm C.
        sample_rate: probability that a device takes part in a round.
        rounds: how many rounds were (or will be) aggregated.
        delta: the δ of (ε, δ)-DP; take it below 1 / fleet size.

    Returns:
        ε (0 for no rounds, inf for σ = 0).

    Raises:
        ValueError: arguments out of range.
    """
    _check(sample_rate, rounds, delta)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, sample_rate: float, rounds: int,
                         delta: float) -> float:
    """The smallest σ (to Opacus' tolerance of 0.01 in ε) that keeps `rounds` rounds within ε.

    Raises:
        ValueError: arguments out of range.
    """
    _check(sample_rate, rounds, delta)
    if not target_epsilon > 0 or rounds == 0:
        raise ValueError("need target_epsilon > 0 and rounds > 0")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search probes tiny σ whose best RDP order is the largest Opacus tries; it warns
        # about those intermediate points, not about the σ it returns.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=rounds,
                                          accountant="rdp"))
