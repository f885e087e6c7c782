"""Exact (FedEx-LoRA residual) aggregation: exactness, low rank, one cumulative residual."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.exact import (
    accumulate_exact,
    compact,
    dense,
    exact_aggregate,
    lora_layers,
    residual,
    residual_nbytes,
    residual_ratio,
)
from protocol.residual import dense_residual
from aggregator.strategies import fedavg

RANK, SCALE = 4, 2.0
LAYERS = {"fc1": (12, 20), "fc2": (8, 12)}  # name -> (d_out, d_in)


def make_lora(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    adapter = {}
    for name, (d_out, d_in) in LAYERS.items():
        adapter[f"{name}.lora_A.weight"] = rng.normal(0, 0.5, (RANK, d_in)).astype(np.float32)
        adapter[f"{name}.lora_B.weight"] = rng.normal(0, 0.5, (d_out, RANK)).astype(np.float32)
    adapter["head.weight"] = rng.normal(0, 0.5, (3, 8)).astype(np.float32)
    return adapter


def model_weights(w0: dict, adapter: dict) -> dict[str, np.ndarray]:
    """W0 + s·B·A per layer (float64)."""
    return {n: w0[n] + SCALE * adapter[f"{n}.lora_B.weight"].astype(np.float64)
            @ adapter[f"{n}.lora_A.weight"] for n in LAYERS}


def fold_into(w0: dict[str, np.ndarray], res: dict) -> dict[str, np.ndarray]:
    return {n: w0[n] + SCALE * dense(res[n]) if n in res else w0[n] for n in LAYERS}


def test_exact_aggregation_equals_weighted_mean_of_client_models() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    w0 = {n: rng.normal(size=shape) for n, shape in LAYERS.items()}
    updates = [(make_lora(s), w) for s, w in ((1, 10.0), (2, 30.0), (3, 60.0), (4, 5.0))]
    # Execute
    adapter, res = exact_aggregate(updates)
    # Assert: W0 + s·R + s·B̄Ā = Σ p_k (W0 + s·B_k A_k)
    got = model_weights(fold_into(w0, res), adapter)
    weights = np.array([w for _, w in updates])
    for n in LAYERS:
        expected = np.average(np.stack([model_weights(w0, u)[n] for u, _ in updates]), axis=0,
                              weights=weights)
        np.testing.assert_allclose(got[n], expected, atol=1e-5)
    np.testing.assert_allclose(adapter["head.weight"], fedavg(updates)["head.weight"])


def test_residual_is_low_rank_and_factored() -> None:
    updates = [(make_lora(s), 1.0 + s) for s in range(5)]
    res = residual(updates)
    assert set(res) == set(LAYERS) == set(lora_layers(updates[0][0]))
    for n, (d_out, d_in) in LAYERS.items():
        u, v = res[n]
        assert u.shape[0] == d_out and v.shape[1] == d_in
        # centred factors: rank ≤ (K−1)·r, and never more than the matrix allows
        assert u.shape[1] == v.shape[0] <= min((len(updates) - 1) * RANK, d_out, d_in)
        dense_rank = np.linalg.matrix_rank(dense(res[n]), tol=1e-6)
        assert u.shape[1] == dense_rank
        assert u.dtype == v.dtype == np.float32
    assert residual_nbytes(res) == sum(u.nbytes + v.nbytes for u, v in res.values())


def test_residual_matches_the_uncentred_definition() -> None:
    updates = [(make_lora(s), float(s)) for s in (1, 2, 3)]
    p = np.array([1.0, 2.0, 3.0]) / 6.0
    res = residual(updates)
    for n in LAYERS:
        a = [u[f"{n}.lora_A.weight"].astype(np.float64) for u, _ in updates]
        b = [u[f"{n}.lora_B.weight"].astype(np.float64) for u, _ in updates]
        mean_of_products = sum(pk * bk @ ak for pk, ak, bk in zip(p, a, b, strict=True))
        product_of_means = sum(pk * bk for pk, bk in zip(p, b, strict=True)) @ sum(
            pk * ak for pk, ak in zip(p, a, strict=True))
        np.testing.assert_allclose(dense(res[n]), mean_of_products - product_of_means, atol=1e-5)


def test_one_update_or_identical_updates_have_zero_rank_residual() -> None:
    adapter = make_lora(7)
    for updates in ([(adapter, 3.0)], [(adapter, 1.0), (dict(adapter), 2.0)]):
        for u, v in residual(updates).values():
            assert u.shape[1] == v.shape[0] == 0


def test_cumulative_residual_brings_a_device_that_skipped_rounds_level_with_the_server() -> None:
    # Prepare: 4 rounds; the server folds every residual into its weights and keeps the
    # cumulative residual R_t (the residual topic's catch-up), while a current device adds
    # each round's step.
    rng = np.random.default_rng(1)
    w0 = {n: rng.normal(size=shape) for n, shape in LAYERS.items()}
    server, stepping, cumulative = dict(w0), dict(w0), {}
    for t in range(1, 5):
        updates = [(make_lora(10 * t + k), float(k + 1)) for k in range(3)]
        _, res = exact_aggregate(updates)
        server = fold_into(server, res)
        stepping = fold_into(stepping, res)
        cumulative = accumulate_exact(cumulative, res)
    # Execute: a device that sat out every round applies R_t once
    device = {n: w + SCALE * dense_residual(cumulative).get(n, 0) for n, w in w0.items()}
    # Assert
    for n in LAYERS:
        np.testing.assert_allclose(device[n], server[n], atol=1e-5)
        np.testing.assert_allclose(stepping[n], server[n], atol=1e-9)


def test_the_ledger_turns_dense_past_the_crossover_rank_and_stays_exact() -> None:
    # 6 rounds of rank-8 residuals on an 8×12 layer pass its crossover 96/20 -> 4
    log = [residual([(make_lora(100 + 3 * t + k), 1.0) for k in range(3)]) for t in range(6)]
    cumulative: dict = {}
    for res in log:
        cumulative = accumulate_exact(cumulative, res)
    assert "fc2.dense" in cumulative and cumulative["fc2.dense"].shape == LAYERS["fc2"]
    expected = sum(dense(r["fc2"]) for r in log)
    np.testing.assert_allclose(dense_residual(cumulative)["fc2"], expected, atol=1e-4)


def test_compact_truncation_is_the_best_low_rank_approximation() -> None:
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(10, 6)), rng.normal(size=(6, 15))
    cu, cv = compact(u, v, max_rank=2)
    assert cu.shape == (10, 2) and cv.shape == (2, 15)
    left, sigma, right = np.linalg.svd(u @ v)
    best = (left[:, :2] * sigma[:2]) @ right[:2]
    np.testing.assert_allclose(dense((cu, cv)), best, atol=1e-4)


@pytest.mark.parametrize("weight", [0.0, -2.0])
def test_non_positive_weights_raise(weight: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        residual([(make_lora(1), 1.0), (make_lora(2), weight)])


def test_inputs_without_lora_or_empty_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        residual([])
    with pytest.raises(ValueError, match="lora_A"):
        residual([({"head.weight": np.ones((2, 2), np.float32)}, 1.0)])


def test_residual_ratio_compares_frobenius_norms_by_hand() -> None:
    # Prepare: one layer, s = 2, B = [[1], [0]], A = [[3, 4]] -> s·BA = [[6, 8], [0, 0]], norm 10;
    # R = [[0, 0], [3, 4]] -> norm 5
    adapter = {"fc1.lora_B.weight": np.array([[1.0], [0.0]], dtype=np.float32),
               "fc1.lora_A.weight": np.array([[3.0, 4.0]], dtype=np.float32),
               "head.weight": np.ones((2, 2), dtype=np.float32)}
    residual = {"fc1": np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)}

    # Execute / Assert
    assert residual_ratio(residual, adapter, {"fc1": 2.0}) == 0.5
