"""Client-level DP: clipping and noise of dp_fedavg, and the RDP accountant's ε."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.privacy import dp_fedavg, dp_strategy
from aggregator.robust import clip_update, delta_norm
from edgefl.privacy_accounting import epsilon, noise_multiplier_for
from tests.conftest import make_adapter

SHAPES = {"a": (4, 6), "b": (6, 4), "head.bias": (3,)}
REFERENCE = make_adapter(0, SHAPES)


def _updates(n: int, scale: float = 1.0,
             seed: int = 1) -> list[tuple[dict[str, np.ndarray], float]]:
    return [({k: v + scale * make_adapter(seed + i, SHAPES)[k] for k, v in REFERENCE.items()},
             float(i + 1)) for i in range(n)]


# -- the mechanism ---------------------------------------------------------------------------
def test_without_noise_it_is_the_unweighted_mean_of_clipped_deltas() -> None:
    updates = _updates(5)
    result = dp_fedavg(updates, REFERENCE, clip_norm=0.5, noise_multiplier=0.0,
                       rng=np.random.default_rng(0))
    clipped = [clip_update(u, REFERENCE, 0.5) for u, _ in updates]
    for name in SHAPES:
        expected = np.mean([c[name] for c in clipped], axis=0)  # weights ignored on purpose
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-6)
        assert result[name].dtype == np.float32


def test_one_client_moves_the_noise_free_average_by_at_most_2c_over_n() -> None:
    # Replace-one adjacency: the sensitivity that calibrates the noise.
    updates = _updates(8)
    attacker = ({k: v + 1e6 for k, v in REFERENCE.items()}, 1e9)
    kwargs = dict(reference=REFERENCE, clip_norm=0.3, noise_multiplier=0.0,
                  rng=np.random.default_rng(0))
    before = dp_fedavg(updates, **kwargs)  # type: ignore[arg-type]
    after = dp_fedavg(updates[:-1] + [attacker], **kwargs)  # type: ignore[arg-type]
    assert delta_norm(after, before) <= 2 * 0.3 / 8 * (1 + 1e-5)


def test_noise_has_standard_deviation_sigma_c_over_n() -> None:
    reference = {"w": np.zeros((200, 250), np.float32)}
    n, clip_norm, sigma = 10, 2.0, 1.5
    same = [({"w": np.full((200, 250), 1e-4, np.float32)}, 1.0)] * n
    result = dp_fedavg(same, reference, clip_norm, sigma, np.random.default_rng(42))
    noise = result["w"].astype(np.float64) - 1e-4
    assert abs(noise.mean()) < 0.1 * sigma * clip_norm / n  # its standard error is ~0.005x
    assert noise.std() == pytest.approx(sigma * clip_norm / n, rel=0.02)


def test_noise_comes_from_the_given_generator() -> None:
    updates = _updates(4)
    strategy = dp_strategy(REFERENCE, 1.0, 1.0, np.random.default_rng(7))
    again = dp_strategy(REFERENCE, 1.0, 1.0, np.random.default_rng(7))
    other = dp_fedavg(updates, REFERENCE, 1.0, 1.0, np.random.default_rng(8))
    first, second = strategy(updates), again(updates)
    for name in SHAPES:
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.allclose(first["a"], other["a"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip_norm": 0.0}, "max_norm"), ({"noise_multiplier": -1.0}, "noise_multiplier"),
])
def test_bad_parameters_are_refused(kwargs: dict[str, float], match: str) -> None:
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dp_fedavg(_updates(2), REFERENCE, rng=np.random.default_rng(0), **args)
    with pytest.raises(ValueError):
        dp_fedavg([], REFERENCE, 1.0, 1.0, np.random.default_rng(0))


# -- the accountant --------------------------------------------------------------------------
def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Tight ε of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_at(eps: float) -> float:
        half = 1 / (2 * sigma)
        return phi(-eps * sigma + half) - math.exp(eps) * phi(-eps * sigma - half)

    low, high = 0.0, 100.0
    for _ in range(200):  # δ(ε) decreases in ε: bisect for δ(ε) = delta
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 50)])
def test_full_participation_epsilon_lies_between_the_tight_and_the_classic_bound(
        sigma: float, rounds: int) -> None:
    # With every device in every round, T rounds at σ are one Gaussian at σ/√T.
    delta = 1e-5
    eps = epsilon(sigma, 1.0, rounds, delta)
    tight = _exact_gaussian_epsilon(sigma / math.sqrt(rounds), delta)
    classic = min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
                  for a in np.linspace(1.01, 500, 20000))
    assert tight <= eps <= classic


def test_epsilon_moves_the_right_way() -> None:
    base = epsilon(1.0, 0.1, 100, 1e-5)
    assert base == pytest.approx(7.9, abs=0.1)  # Opacus' value for this classic setting
    assert epsilon(2.0, 0.1, 100, 1e-5) < base
    assert epsilon(1.0, 0.2, 100, 1e-5) > base
    assert epsilon(1.0, 0.1, 200, 1e-5) > base
    assert epsilon(1.0, 0.1, 100, 1e-7) > base
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 1, 1e-5) == math.inf


def test_noise_multiplier_for_a_target_epsilon_meets_it() -> None:
    sigma = noise_multiplier_for(target_epsilon=4.0, sample_rate=0.05, rounds=200, delta=1e-5)
    assert epsilon(sigma, 0.05, 200, 1e-5) <= 4.0
    assert epsilon(sigma * 0.9, 0.05, 200, 1e-5) > 4.0


@pytest.mark.parametrize("args", [(1.0, 0.0, 10, 1e-5), (1.0, 1.5, 10, 1e-5), (1.0, 0.1, -1, 1e-5),
                                  (1.0, 0.1, 10, 0.0), (-1.0, 0.1, 10, 1e-5)])
def test_accountant_refuses_bad_arguments(args: tuple[float, float, int, float]) -> None:
    with pytest.raises(ValueError):
        epsilon(*args)
