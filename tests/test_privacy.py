"""Client-level DP: CSPRNG noise, the fixed-denominator estimator, and the RDP accountant.

Expected values come from the formulas of McMahan et al. 2018 (arXiv 1710.06963: f̃_f, Lemma 1),
Mironov 2017 (arXiv 1702.07476, Prop. 7) and Balle et al. 2020 (arXiv 1905.09982, Thm. 21),
worked by hand below, not from the code under test.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from aggregator.accounting import DEFAULT_ORDERS, epsilon, gaussian_rdp, rounds_within
from aggregator.privacy import clip_delta, dp_step, gaussian_noise

START = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}  # 3 coordinates in all


def _device(x: float, y: float, z: float) -> dict[str, np.ndarray]:
    """An adapter whose delta from START is (x, y, z): a = (x, y), b = (z,)."""
    return {"a": np.array([x, y], np.float32), "b": np.array([z], np.float32)}


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors["a"], np.float64),
                           np.asarray(tensors["b"], np.float64)])


def _round(devices: list[dict[str, np.ndarray]], *, w: float = 4, c: float = 1.0,
           sigma: float = 0.0) -> np.ndarray:
    """The noise-free (σ = 0) result of one round, as a flat vector."""
    total = {k: np.zeros(v.shape) for k, v in START.items()}
    for device in devices:
        clipped = clip_delta(device, START, c)
        total = {k: total[k] + clipped[k] for k in total}
    return _flat(dp_step(START, total, w, c, sigma))


class _CounterBytes:
    """A deterministic byte source: SHA-256 of a counter, so two instances give the same bytes."""

    def __init__(self, label: bytes = b"x") -> None:
        self.label, self.counter = label, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.label + self.counter.to_bytes(8, "little")).digest()
            self.counter += 1
        return out[:n]


# -- (a) the noise ----------------------------------------------------------------------------
def test_noise_is_not_reproducible_even_with_the_global_numpy_seed_fixed() -> None:
    np.random.seed(0)
    first = gaussian_noise((1000,), 1.0)
    np.random.seed(0)
    second = gaussian_noise((1000,), 1.0)
    assert first.dtype == np.float64 and first.shape == (1000,)
    assert not np.any(first == second)  # 1000 continuous draws: any tie would be a shared source


def test_the_bytes_and_nothing_else_drive_the_noise() -> None:
    np.random.seed(1)
    one = gaussian_noise((7, 3), 2.0, random_bytes=_CounterBytes())
    np.random.seed(2)
    two = gaussian_noise((7, 3), 2.0, random_bytes=_CounterBytes())
    other = gaussian_noise((7, 3), 2.0, random_bytes=_CounterBytes(b"y"))
    np.testing.assert_array_equal(one, two)
    assert one.shape == (7, 3) and not np.allclose(one, other)


def test_box_muller_on_hand_picked_bytes_including_a_zero_uniform() -> None:
    # Words (2**63, 0): u = 2**52 / 2**53 = 0.5, v = 0, so r = √(−2 ln 0.5) = √(2 ln 2) =
    # 1.1774100225 and the pair is (r·cos 0, r·sin 0) = (1.17741, 0); std 2 doubles it.
    half = (2**63).to_bytes(8, "little") + bytes(8)
    np.testing.assert_allclose(gaussian_noise((2,), 2.0, lambda n: half),
                               [2 * 1.1774100225154747, 0.0], atol=1e-12)
    # All-zero bytes: u = 0 must not give log(0) = −inf.
    zeros = gaussian_noise((3,), 1.0, lambda n: bytes(n))
    assert np.all(np.isfinite(zeros))


def test_noise_has_the_requested_normal_distribution() -> None:
    std = 3.0
    draws = gaussian_noise((200_000,), std)
    # Standard errors: mean 3/√200000 ≈ 0.0067; std ≈ 3/√400000 ≈ 0.0047 (0.16 %).
    assert abs(draws.mean()) < 0.03
    assert draws.std() == pytest.approx(std, rel=0.01)
    # Normal, not merely the right variance: P(|Z| < 1) = erf(1/√2) ≈ 0.6827 (s.e. ≈ 0.001).
    assert np.mean(np.abs(draws) < std) == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.005)


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf])
def test_noise_refuses_a_bad_std(std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        gaussian_noise((2,), std)


def test_noise_refuses_a_short_byte_source() -> None:
    with pytest.raises(ValueError, match="bytes"):
        gaussian_noise((4,), 1.0, lambda n: bytes(n - 1))


# -- (b) clipping and sensitivity of f̃_f ------------------------------------------------------
def test_clipping_is_over_all_tensors_together() -> None:
    # Delta (0, 3, 4) spans both tensors, norm 5: scaled by 1/5 to (0, 0.6, 0.8) for C = 1.
    clipped = clip_delta(_device(0, 3, 4), START, 1.0)
    np.testing.assert_allclose(_flat(clipped), [0, 0.6, 0.8], atol=1e-12)
    # A delta of norm 3 along an axis becomes norm 1; one within C is unchanged.
    np.testing.assert_allclose(_flat(clip_delta(_device(3, 0, 0), START, 1.0)), [1, 0, 0])
    np.testing.assert_allclose(_flat(clip_delta(_device(0, 0.5, 0), START, 1.0)), [0, 0.5, 0])


# Three honest devices, C = 1, W = 4: deltas (3,0,0) -> (1,0,0); (0,0.5,0) unchanged;
# (0,0,2) -> (0,0,1). Sum (1, 0.5, 1); the result is START + sum/4 = (0.25, 0.125, 0.25).
HONEST = [_device(3, 0, 0), _device(0, 0.5, 0), _device(0, 0, 2)]


def test_hand_built_round_without_noise() -> None:
    np.testing.assert_allclose(_round(HONEST), [0.25, 0.125, 0.25], atol=1e-7)


@pytest.mark.parametrize(("attacker", "moved"), [
    # An added device with delta v moves the result by clip(v)/W: min(‖v‖, 1)/4.
    ((-0.2, 0, 0), 0.05),  # ‖v‖ = 0.2 -> 0.05
    ((0, -1, 0), 0.25),  # ‖v‖ = 1 -> 0.25
    ((0, 0, -30), 0.25),  # ‖v‖ = 30, clipped to 1 -> 0.25
    ((3e6, -4e6, 0), 0.25),  # ‖v‖ = 5e6, clipped to 1 -> 0.25
])
def test_adding_any_device_moves_the_result_by_at_most_c_over_w(
        attacker: tuple[float, float, float], moved: float) -> None:
    before = _round(HONEST)
    after = _round([*HONEST, _device(*attacker)])
    assert np.linalg.norm(after - before) == pytest.approx(moved, abs=1e-6)
    assert np.linalg.norm(after - before) <= 1 / 4 + 1e-6


def test_removing_a_device_moves_the_result_by_at_most_c_over_w() -> None:
    before = _round(HONEST)
    for i in range(len(HONEST)):
        after = _round(HONEST[:i] + HONEST[i + 1:])
        assert np.linalg.norm(after - before) <= 1 / 4 + 1e-6
    # Removing (3,0,0), clipped (1,0,0): the result drops to (0, 0.125, 0.25), exactly C/W away.
    np.testing.assert_allclose(_round(HONEST[1:]), [0, 0.125, 0.25], atol=1e-7)


def test_replacing_a_device_moves_the_result_by_at_most_2c_over_w() -> None:
    # Replace-one adjacency costs twice add/remove: (1,0,0) -> clipped (−1,0,0) moves the sum by
    # 2, the result by 2/4 = 0.5; the ε of aggregator.accounting is for add/remove adjacency.
    after = _round([_device(-7, 0, 0), *HONEST[1:]])
    np.testing.assert_allclose(after, [-0.25, 0.125, 0.25], atol=1e-7)
    assert np.linalg.norm(after - _round(HONEST)) == pytest.approx(2 / 4, abs=1e-6)


def test_the_denominator_is_w_even_when_fewer_report() -> None:
    # 2 of W = 4 report deltas (1,0) and (0,1): sum (1,1), mean change (1,1)/4, not (1,1)/2.
    start = {"w": np.array([10.0, -10.0], np.float32)}
    total = {"w": clip_delta({"w": np.array([11.0, -10.0])}, start, 1.0)["w"]
             + clip_delta({"w": np.array([10.0, -9.0])}, start, 1.0)["w"]}
    result = dp_step(start, total, expected_contributors=4, clip_norm=1.0, noise_multiplier=0.0)
    np.testing.assert_allclose(result["w"], [10.25, -9.75], atol=1e-6)
    assert result["w"].dtype == np.float32


def test_noise_on_the_sum_has_std_sigma_c() -> None:
    # The noise function is called with the std on the sum, σC = 1.5·2 = 3; divided by W = 6.
    calls: list[tuple[tuple[int, ...], float]] = []

    def constant(shape: tuple[int, ...], std: float) -> np.ndarray:
        calls.append((shape, std))
        return np.full(shape, std)

    result = dp_step(START, {k: np.zeros(v.shape) for k, v in START.items()}, 6, 2.0, 1.5,
                     noise=constant)
    assert sorted(calls) == [((1,), 3.0), ((2,), 3.0)]
    np.testing.assert_allclose(_flat(result), [0.5, 0.5, 0.5])  # 3 / 6


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"expected_contributors": 0}, "expected_contributors"),
    ({"expected_contributors": -2}, "expected_contributors"),
    ({"expected_contributors": math.nan}, "expected_contributors"),
    ({"clip_norm": 0.0}, "clip_norm"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"noise_multiplier": -0.1}, "noise_multiplier"),
    ({"noise_multiplier": math.inf}, "noise_multiplier"),
])
def test_dp_step_refuses_bad_parameters(kwargs: dict[str, float], match: str) -> None:
    args = {"expected_contributors": 4, "clip_norm": 1.0, "noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dp_step(START, {k: np.zeros(v.shape) for k, v in START.items()}, **args)


def test_mismatched_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="names"):
        dp_step(START, {"a": np.zeros(2)}, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        dp_step(START, {"a": np.zeros(3), "b": np.zeros(1)}, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="names"):
        clip_delta({"a": np.zeros(2)}, START, 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_delta(_device(1, 0, 0), START, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_delta(_device(math.nan, 0, 0), START, 1.0)


# -- (d) the old bug: noise scaled by the number that reported -----------------------------------
def test_noise_std_is_sigma_c_over_w_when_only_one_of_w_reports() -> None:
    # W = 8, C = 2, σ = 1.5, one device reports: noise std on the result must be σC/W = 0.375.
    # The old code divided by n = 1 and gave σC = 3.
    start = {"w": np.zeros((200, 250), np.float32)}
    device = {"w": np.full((200, 250), 1e-4, np.float32)}  # norm 0.0224 < C: unclipped
    result = dp_step(start, clip_delta(device, start, 2.0), expected_contributors=8,
                     clip_norm=2.0, noise_multiplier=1.5)
    noise = result["w"].astype(np.float64) - 1e-4 / 8
    # 50 000 draws: std's standard error is 0.32 %, the mean's 0.375/√50000 ≈ 0.0017.
    assert noise.std() == pytest.approx(1.5 * 2.0 / 8, rel=0.02)
    assert abs(noise.mean()) < 0.01


# -- (c) the accountant -----------------------------------------------------------------------
def test_gaussian_rdp_hand_values() -> None:
    assert gaussian_rdp(2.0, 8) == pytest.approx(1.0)  # 8 / (2·2²)
    assert gaussian_rdp(0.5, 1.5) == pytest.approx(3.0)  # 1.5 / (2·0.25)
    assert gaussian_rdp(0.0, 2) == math.inf


def test_epsilon_by_hand_at_one_order() -> None:
    # σ = 2, T = 4, α = 3: RDP = T·α/(2σ²) = 4·3/8 = 1.5. With δ = e⁻¹², Balle et al. Thm 21:
    # ε = 1.5 + ln(2/3) − (ln δ + ln 3)/2 = 1.5 + ln 2 − ln 3 + 6 − (ln 3)/2
    #   = 7.5 + 0.693147 − 1.5·1.098612 = 6.545229.
    delta = math.exp(-12)
    assert epsilon(2.0, 4, delta, orders=[3.0]) == pytest.approx(6.545229, abs=1e-6)
    # The default orders include 3 and the minimum over them can only be lower.
    assert epsilon(2.0, 4, delta) <= 6.545229 + 1e-9
    # σ = 1, T = 1, α = 2, δ = e⁻¹⁰: 1 + ln(1/2) − (−10 + ln 2)/1 = 11 − 2 ln 2 = 9.613706.
    assert epsilon(1.0, 1, math.exp(-10), orders=[2.0]) == pytest.approx(9.613706, abs=1e-6)


def test_epsilon_edge_cases_and_monotonicity() -> None:
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(0.0, 1, 1e-5) == math.inf
    values = [epsilon(1.2, t, 1e-5) for t in range(1, 60)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert epsilon(2.0, 10, 1e-5) < epsilon(1.0, 10, 1e-5)
    assert epsilon(1.0, 10, 1e-7) > epsilon(1.0, 10, 1e-5)


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


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 50), (10.0, 4)])
def test_epsilon_lies_between_the_tight_and_the_classic_bound(sigma: float, rounds: int) -> None:
    # Without subsampling, T rounds at σ are exactly one Gaussian at σ/√T: ε can be no lower than
    # that mechanism's tight ε, and no higher than Mironov's conversion (Prop. 3) at any order.
    delta = 1e-5
    eps = epsilon(sigma, rounds, delta)
    tight = _exact_gaussian_epsilon(sigma / math.sqrt(rounds), delta)
    classic = min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
                  for a in DEFAULT_ORDERS)
    assert tight <= eps <= classic


@pytest.mark.parametrize(("sigma", "rounds", "delta"), [
    (1.0, 1, 1e-5), (1.1, 20, 1e-5), (0.8, 100, 1e-6), (2.5, 500, 1e-7), (4.0, 3, 1e-3),
])
def test_epsilon_agrees_with_opacus_at_sample_rate_one(sigma: float, rounds: int,
                                                       delta: float) -> None:
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        pytest.skip("opacus is not installed")
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, rounds)]
    expected = accountant.get_epsilon(delta=delta)
    assert epsilon(sigma, rounds, delta) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("sigma", "budget", "delta"), [
    (1.0, 8.0, 1e-5), (2.0, 3.0, 1e-5), (0.7, 10.0, 1e-6), (5.0, 1.0, 1e-5), (1.0, 0.5, 1e-5),
])
def test_rounds_within_is_the_boundary_of_epsilon(sigma: float, budget: float,
                                                  delta: float) -> None:
    rounds = rounds_within(sigma, budget, delta)
    assert epsilon(sigma, rounds, delta) <= budget
    assert epsilon(sigma, rounds + 1, delta) > budget


def test_rounds_within_hand_cases() -> None:
    # Only α = 3, σ = 2, δ = e⁻¹²: ε(T) = 3T/8 + ln(2/3) + (12 − ln 3)/2 = 0.375·T + 5.045229.
    # A budget of 7 allows T ≤ (7 − 5.045229)/0.375 = 5.21, so 5 rounds; a budget of 5 none.
    delta = math.exp(-12)
    assert rounds_within(2.0, 7.0, delta, orders=[3.0]) == 5
    assert rounds_within(2.0, 5.0, delta, orders=[3.0]) == 0
    assert rounds_within(0.0, 100.0, 1e-5) == 0  # σ = 0: not one round


@pytest.mark.parametrize("call", [
    lambda: epsilon(-1.0, 10, 1e-5), lambda: epsilon(1.0, -1, 1e-5),
    lambda: epsilon(1.0, 1.5, 1e-5), lambda: epsilon(1.0, 10, 0.0), lambda: epsilon(1.0, 10, 1.0),
    lambda: epsilon(1.0, 10, 1e-5, orders=[1.0]), lambda: epsilon(1.0, 10, 1e-5, orders=[]),
    lambda: gaussian_rdp(1.0, 0.5), lambda: gaussian_rdp(-1.0, 2),
    lambda: rounds_within(1.0, -1.0, 1e-5), lambda: rounds_within(1.0, math.inf, 1e-5),
    lambda: rounds_within(1.0, 1.0, 2.0),
])
def test_accountant_refuses_bad_arguments(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call()


def test_accountant_imports_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, aggregator.accounting as a; a.epsilon(1.0, 10, 1e-5); "
            "assert 'torch' not in sys.modules and 'opacus' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
