"""FedAvg / FLORA maths (arXiv 2404.15182): sample-weighted means of A and B taken separately.

Expected values are worked out by hand from Σ_k n_k·x_k / Σ_k n_k; FedBuff's server step is in
tests/test_fedbuff.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import accumulate, add, delta, fedavg, merge, weighted_mean
from tests.conftest import make_adapter

SHAPES = {"a": (4, 6), "b": (6, 4), "head.bias": (3,)}

# Two clients' rank-1 LoRA factors for one 2×2 layer: B is 2×1, A is 1×2, ΔW = B·A.
B1, A1 = np.array([[2.0], [0.0]], np.float32), np.array([[1.0, 3.0]], np.float32)
B2, A2 = np.array([[0.0], [4.0]], np.float32), np.array([[5.0, -1.0]], np.float32)
CLIENTS = [({"lora_B": B1, "lora_A": A1}, 1.0), ({"lora_B": B2, "lora_A": A2}, 3.0)]


def test_fedavg_weights_each_factor_by_sample_count() -> None:
    # Weights 1 and 3 (Σ = 4):
    #   B = (1·[2, 0] + 3·[0, 4]) / 4 = [2, 12] / 4 = [0.5, 3]
    #   A = (1·[1, 3] + 3·[5, -1]) / 4 = [16, 0] / 4 = [4, 0]
    result = fedavg(CLIENTS)
    np.testing.assert_array_equal(result["lora_B"], [[0.5], [3.0]])
    np.testing.assert_array_equal(result["lora_A"], [[4.0, 0.0]])
    assert result["lora_B"].dtype == np.float32


def test_averaging_factors_is_not_averaging_products() -> None:
    # FLORA's observation: mean(B)·mean(A) ≠ mean(B·A).
    #   mean(B)·mean(A) = [0.5, 3]ᵀ·[4, 0] = [[2, 0], [12, 0]]
    #   B1·A1 = [[2, 6], [0, 0]],  B2·A2 = [[0, 0], [20, -4]]
    #   (1·B1A1 + 3·B2A2) / 4 = [[2, 6], [60, -12]] / 4 = [[0.5, 1.5], [15, -3]]
    result = fedavg(CLIENTS)
    product_of_means = result["lora_B"] @ result["lora_A"]
    np.testing.assert_array_equal(product_of_means, [[2.0, 0.0], [12.0, 0.0]])
    mean_of_products = fedavg([({"w": B1 @ A1}, 1.0), ({"w": B2 @ A2}, 3.0)])["w"]
    np.testing.assert_array_equal(mean_of_products, [[0.5, 1.5], [15.0, -3.0]])
    assert not np.allclose(product_of_means, mean_of_products)


def test_equal_weights_give_the_plain_mean() -> None:
    # (1·[1, 2] + 1·[3, 10]) / 2 = [2, 6]; the weight's scale does not matter: 7 and 7 too.
    pair = [{"x": np.array([1.0, 2.0], np.float32)}, {"x": np.array([3.0, 10.0], np.float32)}]
    for weight in (1.0, 7.0):
        np.testing.assert_array_equal(fedavg([(a, weight) for a in pair])["x"], [2.0, 6.0])


def test_single_update_is_returned_unchanged() -> None:
    adapter = make_adapter(5, SHAPES)
    for name, array in fedavg([(adapter, 7.0)]).items():
        np.testing.assert_array_equal(array, adapter[name])


def test_merged_partial_sums_equal_one_sum() -> None:
    # Gateways: [1, 2] with weights 1, 1 and [6] with weight 2.
    # Σ w·x = 1 + 2 + 12 = 15, Σ w = 4  ->  15 / 4 = 3.75, over 3 updates.
    left = accumulate(accumulate(None, {"x": np.array([1.0], np.float32)}, 1.0),
                      {"x": np.array([2.0], np.float32)}, 1.0)
    right = accumulate(None, {"x": np.array([6.0], np.float32)}, 2.0)
    merged = merge(left, right)
    assert merged.weight == 4.0 and merged.count == 3
    np.testing.assert_array_equal(weighted_mean(merged)["x"], [3.75])
    # and the same as one gateway that saw all three
    whole = fedavg([({"x": np.array([v], np.float32)}, w) for v, w in ((1, 1), (2, 1), (6, 2))])
    np.testing.assert_array_equal(whole["x"], [3.75])


def test_delta_and_add_are_inverse() -> None:
    # delta([5, 1], [2, 3]) = [3, -2];  add([2, 3], [3, -2]) = [5, 1]
    base, adapter = {"x": np.array([2.0, 3.0], np.float32)}, {"x": np.array([5.0, 1.0], np.float32)}
    change = delta(adapter, base)
    np.testing.assert_array_equal(change["x"], [3.0, -2.0])
    np.testing.assert_array_equal(add(base, change)["x"], [5.0, 1.0])


def test_inputs_are_not_mutated() -> None:
    adapter = make_adapter(1, SHAPES)
    before = {k: v.copy() for k, v in adapter.items()}
    fedavg([(adapter, 2.0), (make_adapter(2, SHAPES), 3.0)])
    for name in SHAPES:
        np.testing.assert_array_equal(adapter[name], before[name])


def test_mismatched_names_or_shapes_raise() -> None:
    good = make_adapter(1, SHAPES)
    with pytest.raises(ValueError, match="names differ"):
        fedavg([(good, 1.0), (make_adapter(2, {"a": (4, 6)}), 1.0)])
    with pytest.raises(ValueError, match="shape"):
        fedavg([(good, 1.0), (make_adapter(2, SHAPES | {"a": (6, 4)}), 1.0)])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weight_raises(weight: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        fedavg([(make_adapter(1, SHAPES), weight)])


def test_empty_update_list_raises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fedavg([])
