"""FedAvg maths: weighted mean, mergeable partial sums, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import accumulate, fedavg, merge, weighted_mean
from tests.conftest import make_adapter

SHAPES = {"a": (4, 6), "b": (6, 4), "head.bias": (3,)}


def test_fedavg_weights_by_num_examples() -> None:
    updates = [(make_adapter(s, SHAPES), w) for s, w in ((1, 10.0), (2, 30.0), (3, 60.0))]
    result = fedavg(updates)
    for name in SHAPES:
        expected = np.average(np.stack([u[name] for u, _ in updates]), axis=0,
                              weights=[w for _, w in updates])
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-6)
        assert result[name].dtype == np.float32


def test_single_update_is_returned_unchanged() -> None:
    adapter = make_adapter(5, SHAPES)
    for name, array in fedavg([(adapter, 7.0)]).items():
        np.testing.assert_array_equal(array, adapter[name])


def test_merged_partial_sums_equal_one_sum() -> None:
    updates = [(make_adapter(s, SHAPES), float(s)) for s in range(1, 7)]
    left = right = None
    for adapter, weight in updates[:2]:
        left = accumulate(left, adapter, weight)
    for adapter, weight in updates[2:]:
        right = accumulate(right, adapter, weight)
    assert left is not None and right is not None
    merged = weighted_mean(merge(left, right))
    whole = fedavg(updates)
    for name in SHAPES:
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-6)
    assert merge(left, right).count == 6


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


def test_staleness_weight_discounts_older_updates() -> None:
    from aggregator.strategies import staleness_weight

    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(1) > staleness_weight(2) > staleness_weight(8)
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_fedbuff_step_adds_weighted_mean_delta_to_global() -> None:
    from aggregator.strategies import apply_mean_delta, delta

    base, a, b = (make_adapter(s, SHAPES) for s in (1, 2, 3))
    acc = accumulate(accumulate(None, delta(a, base), 1.0), delta(b, base), 3.0)
    result = apply_mean_delta(base, acc, server_lr=0.5)
    for name in SHAPES:
        expected = base[name] + 0.5 * (0.25 * (a[name] - base[name]) + 0.75 * (b[name] - base[name]))
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-6)
