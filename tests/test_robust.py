"""Robust aggregation (Yin et al. 2018, arXiv 1803.01498; Sun et al. 2019, arXiv 1911.07963).

Median and trimmed mean are checked on hand-worked examples (the arithmetic is in the comments),
then on their robustness guarantees, clipping, and a poisoned federation.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.robust import (
    clip_update,
    clip_updates,
    clipped,
    delta_norm,
    fedmedian,
    trim_count,
    trimmed_mean,
)
from aggregator.strategies import fedavg
from tests.conftest import make_adapter

SHAPES = {"a": (4, 6), "b": (6, 4), "head.bias": (3,)}


def _honest(n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], float]]:
    return [(make_adapter(seed + i, SHAPES), float(10 * (i + 1))) for i in range(n)]


def _outlier(scale: float, seed: int) -> tuple[dict[str, np.ndarray], float]:
    return {k: v * scale for k, v in make_adapter(seed, SHAPES).items()}, 1.0


# -- median ----------------------------------------------------------------------------------
def _scalars(*pairs: tuple[float, float]) -> list[tuple[dict[str, np.ndarray], float]]:
    """One-coordinate adapters {"x": [value]} with their weights."""
    return [({"x": np.array([v], np.float32)}, float(w)) for v, w in pairs]


def test_median_odd_n_is_the_middle_value_per_coordinate() -> None:
    # Coordinate 0: [1, 2, 100] -> 2;  coordinate 1: [30, 10, 20] sorted [10, 20, 30] -> 20
    updates = [({"x": np.array([1.0, 30.0], np.float32)}, 1.0),
               ({"x": np.array([2.0, 10.0], np.float32)}, 1.0),
               ({"x": np.array([100.0, 20.0], np.float32)}, 1.0)]
    result = fedmedian(updates)
    np.testing.assert_array_equal(result["x"], [2.0, 20.0])
    assert result["x"].dtype == np.float32


def test_median_even_n_is_the_mean_of_the_two_middle_values() -> None:
    # [4, 1, 3, 2] sorted [1, 2, 3, 4] -> (2 + 3) / 2 = 2.5;  [-7, 1e6] -> (-7 + 1e6) / 2
    assert fedmedian(_scalars((4, 1), (1, 1), (3, 1), (2, 1)))["x"][0] == 2.5
    assert fedmedian(_scalars((-7, 1), (1e6, 1)))["x"][0] == pytest.approx(499996.5)


def test_weighted_median_follows_the_weights() -> None:
    # Values 0, 1, 5 with weights 1, 1, 3 (Σ = 5, half = 2.5): unweighted median is 1; weighted,
    # the cumulative weight over the sorted values is 1, 2, 5, first ≥ 2.5 at 5.
    updates = _scalars((0, 1), (1, 1), (5, 3))
    assert fedmedian(updates)["x"][0] == 1.0
    assert fedmedian(updates, weighted=True)["x"][0] == 5.0
    # The weights are ignored unless asked for: a huge claimed count buys nothing by default.
    assert fedmedian(_scalars((0, 1), (1, 1), (5, 1e9)))["x"][0] == 1.0


def test_weighted_median_at_exactly_half_the_weight_is_the_midpoint() -> None:
    # Values 1, 2, 3, 4 with weights 3, 1, 2, 2 (Σ = 8, half = 4): cumulative 3, 4, 6, 8 reaches
    # exactly 4 at value 2, so the median is (2 + 3) / 2 = 2.5.
    assert fedmedian(_scalars((1, 3), (2, 1), (3, 2), (4, 2)), weighted=True)["x"][0] == 2.5
    # Equal weights 1, 1, 1, 1: cumulative 1, 2, 3, 4 hits half = 2 at value 20 -> (20 + 30) / 2
    assert fedmedian(_scalars((30, 1), (10, 1), (40, 1), (20, 1)), weighted=True)["x"][0] == 25.0
    # Weights 1, 4, 1 on values 10, 20, 30 (Σ = 6, half = 3): cumulative 1, 5, 6 first ≥ 3 at 20,
    # and 5 ≠ 3, so no midpoint: 20
    assert fedmedian(_scalars((30, 1), (10, 1), (20, 4)), weighted=True)["x"][0] == 20.0


@pytest.mark.parametrize(("honest", "byzantine"), [(3, 2), (6, 5), (10, 4)])
def test_median_ignores_a_minority_of_arbitrary_outliers(honest: int, byzantine: int) -> None:
    # With f < n/2 outliers, every coordinate of the median lies within the honest values' range.
    updates = _honest(honest) + [_outlier(1e6 * (-1) ** i, 100 + i) for i in range(byzantine)]
    result = fedmedian(updates)
    for name in SHAPES:
        stack = np.stack([u[name] for u, _ in updates[:honest]])
        assert np.all(result[name] >= stack.min(axis=0) - 1e-6)
        assert np.all(result[name] <= stack.max(axis=0) + 1e-6)


# -- trimmed mean ----------------------------------------------------------------------------
@pytest.mark.parametrize(("beta", "n", "cut"), [
    (0.2, 5, 1),     # ⌊1.0⌋
    (0.1, 10, 1),    # ⌊1.0⌋
    (0.1, 3, 0),     # ⌊0.3⌋: nothing trimmed
    (0.0, 50, 0),    # ⌊0⌋
    (0.25, 10, 2),   # ⌊2.5⌋
    (0.29, 100, 29),  # ⌊29⌋ although 0.29 * 100 = 28.999999999999996 in floating point
    (0.49, 4, 1),    # ⌊1.96⌋
])
def test_trim_count_is_floor_of_beta_times_n(beta: float, n: int, cut: int) -> None:
    assert trim_count(beta, n) == cut


def test_trim_count_rejects_bad_arguments() -> None:
    for beta in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="beta"):
            trim_count(beta, 10)
    with pytest.raises(ValueError, match="n must"):
        trim_count(0.2, 0)


def test_trimmed_mean_drops_one_value_at_each_end_for_beta_n_equal_one() -> None:
    # n = 5, β = 0.2: ⌊0.2·5⌋ = 1 dropped at each end, per coordinate.
    #   coordinate 0: [1, 100, 2, 3, 4] sorted [1, 2, 3, 4, 100] -> (2 + 3 + 4) / 3 = 3
    #   coordinate 1: [-50, 1e6, 6, 2, 10] sorted [-50, 2, 6, 10, 1e6] -> (2 + 6 + 10) / 3 = 6
    columns = [(1.0, -50.0), (100.0, 1e6), (2.0, 6.0), (3.0, 2.0), (4.0, 10.0)]
    updates = [({"x": np.array(c, np.float32)}, 1.0) for c in columns]
    result = trimmed_mean(updates, beta=0.2)
    np.testing.assert_array_equal(result["x"], [3.0, 6.0])
    assert result["x"].dtype == np.float32


def test_weighted_trimmed_mean_weights_only_the_kept_values() -> None:
    # Values 1, 2, 3, 4, 100 with weights 1, 1, 1, 3, 1000; β = 0.2 drops 1 and 100 by rank
    # (the outlier's claimed weight of 1000 does not save it). Kept: 2, 3, 4 with weights 1, 1, 3:
    #   (1·2 + 1·3 + 3·4) / (1 + 1 + 3) = 17 / 5 = 3.4;  unweighted: (2 + 3 + 4) / 3 = 3
    updates = _scalars((1, 1), (2, 1), (3, 1), (4, 3), (100, 1000))
    assert trimmed_mean(updates, 0.2, weighted=True)["x"][0] == pytest.approx(3.4)
    assert trimmed_mean(updates, 0.2)["x"][0] == 3.0


def test_trimmed_mean_drops_the_extremes_at_each_end() -> None:
    # n = 10: β = 0.1 drops ±1e9, mean(1..8) = 36 / 8 = 4.5; β = 0.2 also drops 1 and 8,
    # mean(2..7) = 27 / 6 = 4.5.
    values = [-1e9, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1e9]
    updates = [({"x": np.array([v], np.float32)}, 1.0) for v in values]
    assert trimmed_mean(updates, beta=0.1)["x"][0] == 4.5
    assert trimmed_mean(updates, beta=0.2)["x"][0] == 4.5


def test_trimmed_mean_that_would_trim_nothing_raises() -> None:
    # n = 3, β = 0.1: ⌊0.3⌋ = 0, which would silently be the plain mean.
    with pytest.raises(ValueError, match="trim nothing"):
        trimmed_mean(_scalars((1, 1), (2, 1), (3, 1)), beta=0.1)
    with pytest.raises(ValueError, match="trim nothing"):
        trimmed_mean(_honest(5), beta=0.0)


def test_trimmed_mean_equals_mean_when_clients_agree() -> None:
    # No outliers at all: identical updates survive any trimming unchanged.
    adapter = make_adapter(1, SHAPES)
    result = trimmed_mean([(adapter, 1.0)] * 10, beta=0.3)
    for name in SHAPES:
        np.testing.assert_allclose(result[name], adapter[name], rtol=1e-6)


@pytest.mark.parametrize("byzantine", [1, 2])
def test_trimmed_mean_bounded_by_honest_range_when_beta_covers_the_outliers(byzantine: int) -> None:
    updates = _honest(8) + [_outlier(-1e6, 50 + i) for i in range(byzantine)]
    result = trimmed_mean(updates, beta=byzantine / len(updates))
    for name in SHAPES:
        stack = np.stack([u[name] for u, _ in updates[:8]])
        assert np.all(result[name] >= stack.min(axis=0) - 1e-5)
        assert np.all(result[name] <= stack.max(axis=0) + 1e-5)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(_honest(10), beta=beta)


@pytest.mark.parametrize("strategy", [fedmedian, partial(trimmed_mean, beta=0.25)])
def test_robust_strategies_check_their_inputs(strategy) -> None:  # noqa: ANN001
    # Four updates with β = 0.25 trim one at each end, so only the input error can be raised.
    good = [(make_adapter(s, SHAPES), 1.0) for s in range(3)]
    with pytest.raises(ValueError, match="at least one"):
        strategy([])
    with pytest.raises(ValueError, match="names differ"):
        strategy(good + [(make_adapter(9, {"a": (4, 6)}), 1.0)])
    with pytest.raises(ValueError, match="shape"):
        strategy(good + [(make_adapter(9, {**SHAPES, "a": (6, 4)}), 1.0)])
    with pytest.raises(ValueError, match="positive"):
        strategy(good + [(make_adapter(9, SHAPES), 0.0)])


def test_robust_strategies_do_not_mutate_inputs() -> None:
    updates = _honest(4)
    before = [{k: v.copy() for k, v in u.items()} for u, _ in updates]
    fedmedian(updates)
    trimmed_mean(updates, 0.25)
    clipped(partial(trimmed_mean, beta=0.25), make_adapter(9, SHAPES), 0.1)(updates)
    for (adapter, _), copy in zip(updates, before, strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(adapter[name], copy[name])


# -- clipping --------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-2, 10.0))
def test_clipping_bounds_the_distance_from_the_global(seed: int, scale: float,
                                                      max_norm: float) -> None:
    reference = make_adapter(seed, SHAPES)
    adapter = {k: v + scale * make_adapter(seed + 1, SHAPES)[k] for k, v in reference.items()}
    clipped_adapter = clip_update(adapter, reference, max_norm)
    norm = delta_norm(adapter, reference)
    assert delta_norm(clipped_adapter, reference) <= max_norm * (1 + 1e-5) + 1e-6
    if norm <= max_norm:  # already inside the ball: untouched
        for name in SHAPES:
            np.testing.assert_array_equal(clipped_adapter[name], adapter[name])
    else:  # on the ball's surface, in the same direction
        assert delta_norm(clipped_adapter, reference) == pytest.approx(max_norm, rel=1e-4)
        direction = (adapter["a"] - reference["a"]).ravel()
        kept = (clipped_adapter["a"] - reference["a"]).ravel()
        assert float(direction @ kept) > 0


def test_clipped_strategy_bounds_each_clients_pull_on_fedavg() -> None:
    reference = make_adapter(0, SHAPES)
    honest = [({k: v + 0.01 for k, v in reference.items()}, 1.0) for _ in range(9)]
    attacker = ({k: v - 1e4 for k, v in reference.items()}, 1.0)
    robust = clipped(fedavg, reference, max_norm=1.0)(honest + [attacker])
    # One client among ten, clipped to norm 1, can move the average by at most 1/10.
    assert delta_norm(robust, reference) <= 0.1 + delta_norm(honest[0][0], reference)
    assert delta_norm(fedavg(honest + [attacker]), reference) > 100
    assert [w for _, w in clip_updates(honest, reference, 1.0)] == [1.0] * 9
    with pytest.raises(ValueError):
        clipped(fedavg, reference, 0.0)


# -- a poisoned federation on Fashion-MNIST ----------------------------------------------------
DEVICES, MALICIOUS, ROUNDS, LOCAL_STEPS = 10, (0, 1), 3, 20
BOOST = -10.0  # attackers send global + BOOST * (their honest delta): sign-flipped, scaled ×10
TRIM_BETA, CLIP_NORM = 0.2, 1.0  # honest deltas measured here have norms of about 0.2-1.3
EVAL_SIZE = 2000


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    # On a shared 2-core machine a second intra-op thread makes these tiny steps ~10x slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_robust_aggregation_survives_poisoned_devices_on_fashion_mnist(
        cnn_artifacts: Path, one_torch_thread: None) -> None:
    from safetensors.numpy import load_file

    from edge_client.data import device_partitions
    from edge_client.trainer import evaluate_dataset, make_trainer, train_local
    from protocol.manifest import load_manifest
    from workloads import fmnist

    # Prepare: 10 non-IID devices (Dirichlet α = 0.5), the torch reference trainer
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    trainer = make_trainer("torch", cnn_artifacts)
    private, parts = device_partitions(DEVICES, 0.5, seed=0)
    shares = [private.subset(p) for p in parts]
    test = fmnist.load("t10k").subset(np.arange(EVAL_SIZE))

    def federate(make_strategy, attack: bool) -> float:  # noqa: ANN001
        global_adapter = initial
        for round_number in range(ROUNDS):
            updates = []
            for i, share in enumerate(shares):
                trainer.set_adapter(global_adapter)
                rng = np.random.default_rng(1000 * round_number + i)  # same data order per run
                result = train_local(trainer, share.x, share.y, LOCAL_STEPS, rng)
                adapter = trainer.get_adapter()
                if attack and i in MALICIOUS:
                    adapter = {k: global_adapter[k] + BOOST * (v - global_adapter[k])
                               for k, v in adapter.items()}
                updates.append((adapter, float(result.samples)))
            global_adapter = make_strategy(global_adapter)(updates)
        trainer.set_adapter(global_adapter)
        return evaluate_dataset(trainer, test.x, test.y)[1]

    def robust(global_adapter: dict[str, np.ndarray]):  # noqa: ANN202
        return clipped(lambda u: trimmed_mean(u, TRIM_BETA), global_adapter, CLIP_NORM)

    # Execute
    clean = federate(lambda g: fedavg, attack=False)
    poisoned_fedavg = federate(lambda g: fedavg, attack=True)
    poisoned_robust = federate(robust, attack=True)

    # Assert: FedAvg collapses, trimmed mean + clipping stays within 3 points of the clean run
    assert clean > 0.80, f"clean federation only reached {clean:.3f}"
    assert poisoned_robust >= clean - 0.03, (clean, poisoned_robust)
    assert poisoned_fedavg <= clean - 0.20, (clean, poisoned_fedavg)
