"""FedBuff's server step (Nguyen et al., AISTATS 2022, arXiv 2106.06639, Algorithm 1).

    x ← x + η_g · (Σ_k s(τ_k)·Δ_k) / K,   s(τ) = 1/sqrt(1 + τ),   K = the buffer size

Every expected value below is worked out by hand from that formula.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import fedbuff_step, staleness_weight


def vec(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, np.float32)}


GLOBAL = vec(10.0, -1.0)


def test_staleness_weight_is_one_over_sqrt_one_plus_tau() -> None:
    assert staleness_weight(0) == 1.0  # 1/sqrt(1)
    assert staleness_weight(3) == 0.5  # 1/sqrt(4)
    assert staleness_weight(8) == pytest.approx(1 / 3)  # 1/sqrt(9)
    assert staleness_weight(15) == 0.25  # 1/sqrt(16)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1)


def test_two_updates_of_different_staleness() -> None:
    # K = 2, Δ_1 = [2, 0] fresh (s = 1), Δ_2 = [0, 4] three versions old (s = 1/2), η_g = 1:
    # (1·[2, 0] + 0.5·[0, 4]) / 2 = [2, 2] / 2 = [1, 1]  ->  x + [1, 1] = [11, 0]
    result = fedbuff_step(GLOBAL, [(vec(2.0, 0.0), 0), (vec(0.0, 4.0), 3)], server_lr=1.0)
    np.testing.assert_array_equal(result["x"], [11.0, 0.0])
    assert result["x"].dtype == np.float32


def test_a_uniformly_stale_buffer_is_damped_not_renormalised() -> None:
    # K = 2 identical deltas [4, -8]. Fresh: (1·Δ + 1·Δ) / 2 = [4, -8].
    # All τ = 3: (0.5·Δ + 0.5·Δ) / 2 = [2, -4], exactly half the fresh step. (Dividing by
    # Σ s(τ_k) = 1 instead of K = 2 would give [4, -8] again: staleness would not matter.)
    change = vec(4.0, -8.0)
    fresh = fedbuff_step(GLOBAL, [(change, 0), (change, 0)], server_lr=1.0)
    stale = fedbuff_step(GLOBAL, [(change, 3), (change, 3)], server_lr=1.0)
    np.testing.assert_array_equal(fresh["x"], [14.0, -9.0])  # [10, -1] + [4, -8]
    np.testing.assert_array_equal(stale["x"], [12.0, -5.0])  # [10, -1] + [2, -4]


@pytest.mark.parametrize(("server_lr", "expected"), [
    (0.5, [10.5, -0.5]),  # [10, -1] + 0.5·[1, 1]
    (1.0, [11.0, 0.0]),   # [10, -1] + 1·[1, 1]
    (3.0, [13.0, 2.0]),   # [10, -1] + 3·[1, 1]
])
def test_server_learning_rate_scales_the_step_linearly(server_lr: float,
                                                       expected: list[float]) -> None:
    # The buffer of test_two_updates_of_different_staleness: (Σ s(τ_k)·Δ_k) / K = [1, 1].
    buffered = [(vec(2.0, 0.0), 0), (vec(0.0, 4.0), 3)]
    np.testing.assert_array_equal(fedbuff_step(GLOBAL, buffered, server_lr)["x"], expected)


def test_each_tensor_is_stepped_and_the_buffer_size_divides() -> None:
    # K = 3 over two tensors, staleness 0, 8, 15 (s = 1, 1/3, 1/4), η_g = 2:
    #   a: (1·3 + (1/3)·6 + (1/4)·(-20)) / 3 = (3 + 2 - 5) / 3 = 0      ->  1 + 2·0 = 1
    #   b: (1·[0, 3] + (1/3)·[3, 0] + (1/4)·[4, 4]) / 3 = [2, 4] / 3    ->  [0, 0] + 2·[2/3, 4/3]
    base = {"a": np.array([1.0], np.float32), "b": np.zeros(2, np.float32)}
    buffered = [({"a": np.array([3.0], np.float32), "b": np.array([0.0, 3.0], np.float32)}, 0),
                ({"a": np.array([6.0], np.float32), "b": np.array([3.0, 0.0], np.float32)}, 8),
                ({"a": np.array([-20.0], np.float32), "b": np.array([4.0, 4.0], np.float32)}, 15)]
    result = fedbuff_step(base, buffered, server_lr=2.0)
    np.testing.assert_allclose(result["a"], [1.0], atol=1e-6)
    np.testing.assert_allclose(result["b"], [4 / 3, 8 / 3], rtol=1e-6)


def test_inputs_are_not_mutated() -> None:
    change = vec(2.0, 0.0)
    fedbuff_step(GLOBAL, [(change, 1)], server_lr=1.0)
    np.testing.assert_array_equal(GLOBAL["x"], [10.0, -1.0])
    np.testing.assert_array_equal(change["x"], [2.0, 0.0])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fedbuff_step(GLOBAL, [], server_lr=1.0)
    for lr in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="server_lr"):
            fedbuff_step(GLOBAL, [(vec(1.0, 1.0), 0)], server_lr=lr)
    with pytest.raises(ValueError, match="staleness"):
        fedbuff_step(GLOBAL, [(vec(1.0, 1.0), -1)], server_lr=1.0)
    with pytest.raises(ValueError, match="names differ"):
        fedbuff_step(GLOBAL, [({"y": np.zeros(2, np.float32)}, 0)], server_lr=1.0)
    with pytest.raises(ValueError, match="shape"):
        fedbuff_step(GLOBAL, [(vec(1.0, 1.0, 1.0), 0)], server_lr=1.0)
