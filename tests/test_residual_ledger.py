"""The cumulative residual of exact aggregation: rank budget, folding, wire form, payload limit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from aggregator.exact import (
    accumulate_exact,
    catch_up,
    catch_up_copy,
    crossover_rank,
    dense,
    exact_aggregate,
    ledger_rank,
    rank_budget,
    residual_from_tensors,
    residual_nbytes,
    residual_tensors,
    scaled,
)
from protocol import codec
from protocol.codec import MAX_PAYLOAD_BYTES, PayloadTooLarge
from protocol.messages import GlobalModel, ResidualModel
from protocol.residual import dense_residual
from protocol.manifest import Manifest

# all-MiniLM-L6-v2 with LoRA r=8, α=16 on query and value (workloads/minilm.py): 12 layers.
MINILM_LAYERS = {f"bert.encoder.layer.{i}.attention.self.{m}": (384, 384)
                 for i in range(6) for m in ("query", "value")}
MINILM_R, MINILM_ALPHA = 8, 16
# Room left for the codec's own bytes (safetensors header: ~120 B per tensor; JSON header; zstd
# frame): the gateway reserves it on top of the adapter's bytes.
CODEC_MARGIN = 64 * 1024


@pytest.fixture()
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread: on a busy 2-core machine OpenBLAS's threads contend, ~10x slower here."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def e(n: int, i: int) -> np.ndarray:
    """The i-th unit vector of length n, as a column."""
    out = np.zeros((n, 1))
    out[i] = 1.0
    return out


def minilm_adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    adapter = {}
    for layer, (d_out, d_in) in MINILM_LAYERS.items():
        adapter[f"{layer}.lora_A.weight"] = rng.normal(0, 0.05, (MINILM_R, d_in)).astype(np.float32)
        adapter[f"{layer}.lora_B.weight"] = rng.normal(0, 0.05, (d_out, MINILM_R)).astype(
            np.float32)
    adapter["head.weight"] = rng.normal(0, 0.05, (4, 384)).astype(np.float32)
    adapter["head.bias"] = np.zeros(4, np.float32)
    return adapter


def adapter_bytes(adapter: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in adapter.values())


def make_manifest(lora: dict[str, object]) -> Manifest:
    return Manifest(workload="w", base_sha256="0" * 64, batch_size=1, input_shape=(1, 64),
                    input_dtype="int64", labels=("a", "b"), lora=lora, tensors=())


# --- crossover_rank and rank_budget ----------------------------------------------------------


def test_crossover_rank_by_hand() -> None:
    assert crossover_rank(384, 384) == 192  # 384·384 / 768
    assert crossover_rank(768, 384) == 256  # 294912 / 1152, exact
    assert crossover_rank(128, 1568) == 118  # 200704 / 1696 = 118.3 (the CNN's fc1)
    assert crossover_rank(8, 12) == 4  # 96 / 20 = 4.8
    assert crossover_rank(1, 1) == 0  # a 1×1 factor pair costs 2 numbers, the matrix 1
    with pytest.raises(ValueError, match="positive"):
        crossover_rank(0, 5)


def test_rank_budget_by_hand() -> None:
    # Prepare: one rank costs 4·((10+20) + (8+12)) = 200 bytes; the crossovers are 6 and 4.
    shapes = {"a": (10, 20), "b": (8, 12)}
    # Execute / Assert: the bytes bind ...
    assert rank_budget(shapes, reserved_bytes=100, limit_bytes=700) == 3  # 600 // 200
    assert rank_budget(shapes, reserved_bytes=100, limit_bytes=899) == 3  # 799 // 200
    assert rank_budget(shapes, reserved_bytes=100, limit_bytes=100) == 0
    # ... or the smallest crossover does (rank 4 costs exactly the 800 left: it fits)
    assert rank_budget(shapes, reserved_bytes=100, limit_bytes=900) == 4
    assert rank_budget(shapes, reserved_bytes=0, limit_bytes=10_000) == 4
    with pytest.raises(ValueError, match="exceed"):
        rank_budget(shapes, reserved_bytes=101, limit_bytes=100)
    with pytest.raises(ValueError, match="at least one"):
        rank_budget({}, 0, 100)


def test_rank_budget_of_minilm() -> None:
    # One rank costs 12·4·768 = 36864 bytes. At 8 MiB the crossover 192 binds (bytes allow 219);
    # at 4 MiB the bytes do: (4194304 − 301072 − 65536) // 36864 = 103.
    reserved = adapter_bytes(minilm_adapter(np.random.default_rng(0)))
    assert reserved == 12 * 2 * 8 * 384 * 4 + (4 * 384 + 4) * 4 == 301072
    assert rank_budget(MINILM_LAYERS, reserved + CODEC_MARGIN, MAX_PAYLOAD_BYTES) == 192
    assert rank_budget(MINILM_LAYERS, reserved + CODEC_MARGIN, 4 * 1024 * 1024) == 103


# --- the ledger: exact cumulative, catch-up copies ---------------------------------------------


def orthogonal_pair() -> tuple[dict, dict]:
    """R1 = 2·e0 f1ᵀ (σ = 2) and R2 = 3·e2 f0ᵀ (σ = 3) on a 3×4 layer: orthogonal directions."""
    cumulative = {"w": (2.0 * e(3, 0), 1.0 * e(4, 1).T)}
    increment = {"w": (1.5 * e(3, 2), 2.0 * e(4, 0).T)}
    return cumulative, increment


def test_two_rank_one_residuals_accumulate_to_their_exact_rank_two_sum() -> None:
    cumulative, increment = orthogonal_pair()
    # Execute: a 3×4 layer's crossover is 12/7 -> 1, so rank 2 is kept dense
    total = accumulate_exact(residual_tensors(cumulative), increment)
    # Assert
    expected = dense(cumulative["w"]) + dense(increment["w"])
    assert set(total) == {"w.dense"}
    np.testing.assert_allclose(dense_residual(total)["w"], expected, atol=1e-6)
    # on a larger layer (crossover 8·8/16 = 4) rank 2 stays factored, still exact
    big = {"w": (2.0 * e(8, 0), e(8, 1).T)}
    step = {"w": (3.0 * e(8, 2), e(8, 3).T)}
    total = accumulate_exact(residual_tensors(big), step)
    assert total["w.U"].shape == (8, 2)
    np.testing.assert_allclose(dense_residual(total)["w"], dense(big["w"]) + dense(step["w"]),
                               atol=1e-6)


def test_a_catch_up_over_the_limit_keeps_the_larger_direction_and_reports_what_it_dropped() -> None:
    cumulative, increment = orthogonal_pair()
    total = accumulate_exact(residual_tensors(cumulative), increment)  # 12 floats, 48 bytes
    # Within the limit the copy is R_t itself
    exact, error = catch_up(total, reserved_bytes=0, limit_bytes=48)
    assert error == 0.0 and exact.keys() == total.keys()
    # One rank of a 3×4 layer costs 4·(3 + 4) = 28 bytes: 40 bytes leave room for rank 1 only
    copy, error = catch_up(total, reserved_bytes=0, limit_bytes=40)
    # Assert: the σ = 3 direction survives, the σ = 2 one is dropped: error 2 / sqrt(2² + 3²)
    np.testing.assert_allclose(dense_residual(copy)["w"], dense(increment["w"]), atol=1e-6)
    assert copy["w.U"].shape == (3, 1)
    assert error == pytest.approx(2.0 / np.sqrt(2.0**2 + 3.0**2), rel=1e-6)


def test_catch_up_error_is_over_all_layers() -> None:
    # Prepare: layer "x" holds σ = 1, 2 (truncates to rank 1), "y" holds σ = 2, "z" σ = 4
    cumulative = accumulate_exact({}, {"x": (np.hstack([e(8, 0), 2.0 * e(8, 1)]),
                                             np.vstack([e(8, 0).T, e(8, 1).T])),
                                       "y": (2.0 * e(8, 1), e(8, 0).T),
                                       "z": (4.0 * e(8, 0), e(8, 1).T)})
    # One rank of the three 8×8 layers costs 4·16·3 = 192 bytes: 200 bytes hold rank 1
    copy, error = catch_up(cumulative, reserved_bytes=0, limit_bytes=200)
    # Assert: ‖dropped‖² = 1, ‖exact‖² = 1 + 4 + 4 + 16
    assert {copy[f"{n}.U"].shape[1] for n in "xyz"} == {1}
    assert error == pytest.approx(1.0 / 5.0, rel=1e-6)  # R_t is kept in float32


def test_cancelled_directions_leave_rank_zero_and_bad_input_is_refused() -> None:
    u, v = np.ones((3, 1)), np.ones((1, 5))
    total = accumulate_exact(residual_tensors({"w": (u, v)}), {"w": (-u, v)})
    assert total["w.U"].shape == (3, 0)
    assert accumulate_exact({}, {}) == {}
    with pytest.raises(ValueError, match="'w'"):
        accumulate_exact(residual_tensors({"w": (u, v)}), {"w": (np.ones((4, 1)), v)})


# --- wire form and scaling ------------------------------------------------------------------


def test_residual_tensors_round_trip_and_reject_broken_factors() -> None:
    rng = np.random.default_rng(0)
    res = {"fc1": (rng.normal(size=(6, 2)), rng.normal(size=(2, 9))),
           "enc.layer.0.query": (np.zeros((4, 0)), np.zeros((0, 4)))}
    tensors = residual_tensors(res)
    assert set(tensors) == {"fc1.U", "fc1.V", "enc.layer.0.query.U", "enc.layer.0.query.V"}
    assert all(t.dtype == np.float32 for t in tensors.values())
    back = residual_from_tensors(tensors)
    assert set(back) == set(res)
    np.testing.assert_allclose(dense(back["fc1"]), dense(res["fc1"]), rtol=1e-6)
    assert residual_nbytes(back) == sum(t.nbytes for t in tensors.values())
    with pytest.raises(ValueError, match="no 'fc1.V'"):
        residual_from_tensors({"fc1.U": tensors["fc1.U"]})
    with pytest.raises(ValueError, match=r"fc2.V.*\.U"):
        residual_from_tensors({"fc2.V": tensors["fc1.V"]})
    with pytest.raises(ValueError, match="do not multiply"):
        residual_from_tensors({"fc1.U": tensors["fc1.U"], "fc1.V": tensors["fc1.V"].T})
    with pytest.raises(ValueError, match="neither"):
        residual_from_tensors(tensors | {"fc1.W": tensors["fc1.U"]})


def test_scaled_multiplies_u_by_the_layer_scaling() -> None:
    res = {"a": (np.ones((2, 1)), np.full((1, 3), 2.0)), "b": (np.ones((1, 1)), np.ones((1, 1)))}
    out = scaled(res, {"a": 2.0, "b": 0.5})
    np.testing.assert_allclose(dense(out["a"]), np.full((2, 3), 4.0))
    np.testing.assert_allclose(out["a"][1], res["a"][1])  # V is untouched
    np.testing.assert_allclose(dense(out["b"]), [[0.5]])
    with pytest.raises(ValueError, match="'b'"):
        scaled(res, {"a": 1.0})


def test_manifest_lora_scaling_is_alpha_over_r_with_peft_overrides() -> None:
    # Prepare: what workloads/minilm.py writes, then peft-style per-layer overrides
    plain = make_manifest({"r": 8, "alpha": 16, "targets": ["query", "value"]})
    patterned = make_manifest({"r": 8, "alpha": 16, "rank_pattern": {"value": 4},
                               "alpha_pattern": {"layer.0.attention.self.query": 32}})
    q0 = "bert.encoder.layer.0.attention.self.query"
    q1 = "bert.encoder.layer.1.attention.self.query"
    # Execute / Assert
    assert plain.lora_scaling(q0) == 2.0
    assert patterned.lora_scaling(q0) == 4.0  # 32 / 8
    assert patterned.lora_scaling(q1) == 2.0  # no pattern matches: 16 / 8
    assert patterned.lora_scaling("bert.encoder.layer.3.attention.self.value") == 4.0  # 16 / 4
    assert patterned.lora_scaling("x.not_value") == 2.0  # a suffix must start at a dot
    assert make_manifest({"r": 4, "alpha": 8, "use_rslora": True}).lora_scaling("fc1") == 4.0
    with pytest.raises(ValueError, match="lack"):
        make_manifest({"r": 4}).lora_scaling("fc1")
    # the method leaves the manifest's JSON, and so its hash, as it was
    assert Manifest.from_json(patterned.to_json()).sha256 == patterned.sha256


def test_manifest_lora_scaling_matches_peft() -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = (torch.nn.Linear(8, 8) for _ in range(3))

    lora = {"r": 4, "alpha": 8, "rank_pattern": {"fc2": 2}, "alpha_pattern": {"out": 12}}
    model = peft.get_peft_model(Net(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "fc2", "out"],
        rank_pattern=lora["rank_pattern"], alpha_pattern=lora["alpha_pattern"]))
    manifest = make_manifest(lora)
    for name in ("fc1", "fc2", "out"):
        layer = getattr(model.base_model.model, name)
        assert manifest.lora_scaling(name) == pytest.approx(layer.scaling["default"])


# --- the payload limit ----------------------------------------------------------------------


@pytest.mark.usefixtures("one_blas_thread")
def test_thirty_rounds_of_minilm_stay_exact_and_within_the_payload_limit() -> None:
    # Prepare
    rng = np.random.default_rng(42)
    scaling = {layer: MINILM_ALPHA / MINILM_R for layer in MINILM_LAYERS}
    cumulative: dict = {}
    exact_sum = {layer: np.zeros(shape) for layer, shape in MINILM_LAYERS.items()}
    added_rank = 0
    for t in range(32):
        k = int(rng.integers(3, 11))
        updates = [(minilm_adapter(rng), float(rng.uniform(1.0, 100.0))) for _ in range(k)]
        adapter, res = exact_aggregate(updates)
        step = scaled(res, scaling)
        # Execute: the ledger adds the step; the global carries only the step
        cumulative = accumulate_exact(cumulative, step)
        payload = codec.encode_global(GlobalModel(
            "fed", t + 1, "ab" * 32, adapter, residual=True,
            residual_step=residual_tensors(step)))
        copy, error = catch_up_copy(cumulative)
        catch_up_payload = codec.encode_residual(ResidualModel("fed", t + 1, "ab" * 32, copy,
                                                               error))
        # Assert: random updates are in general position, so each round adds (K−1)·r to the rank
        added_rank += (k - 1) * MINILM_R
        assert len(payload) <= MAX_PAYLOAD_BYTES and len(catch_up_payload) <= MAX_PAYLOAD_BYTES
        # the global's size depends on this round's K only, never on t
        step_bytes = 4 * (k - 1) * MINILM_R * sum(a + b for a, b in MINILM_LAYERS.values())
        assert len(payload) <= step_bytes + adapter_bytes(adapter) + 64 * 1024
        for layer, f in step.items():
            assert f[0].shape[1] == (k - 1) * MINILM_R  # a step never grows with t
            exact_sum[layer] += dense(f)
        # exact every round, factored up to the crossover (192) and dense after it
        got = dense_residual(cumulative)
        for layer in MINILM_LAYERS:
            assert np.linalg.norm(got[layer] - exact_sum[layer]) <= 1e-5 * np.linalg.norm(
                exact_sum[layer])
        assert ledger_rank(cumulative) == (added_rank if added_rank <= 192 else 384)
        assert all(k.endswith(".dense") for k in cumulative) == (added_rank > 192)
        # 12 dense 384×384 layers (7.1 MB) still fit: the catch-up copy is exact too
        assert error == 0.0
    assert added_rank > 384
    back = codec.decode_residual(catch_up_payload)
    for layer in MINILM_LAYERS:
        np.testing.assert_array_equal(dense_residual(back.residual)[layer],
                                      dense_residual(cumulative)[layer])


@pytest.mark.usefixtures("one_blas_thread")
def test_a_tighter_limit_truncates_only_the_catch_up_copy() -> None:
    # 4 MiB: 12 dense MiniLM layers (7.1 MB) no longer fit; devices that follow every step
    # stay exact, the catch-up copy is truncated to the rank the bytes allow and says so
    rng = np.random.default_rng(7)
    scaling = {layer: MINILM_ALPHA / MINILM_R for layer in MINILM_LAYERS}
    cumulative: dict = {}
    for _ in range(3):
        updates = [(minilm_adapter(rng), 1.0 + k) for k in range(10)]  # +72 rank per round
        cumulative = accumulate_exact(cumulative, scaled(exact_aggregate(updates)[1], scaling))
    limit = 4 * 1024 * 1024
    copy, error = catch_up(cumulative, reserved_bytes=64 * 1024, limit_bytes=limit)
    rank = (limit - 64 * 1024) // (4 * 768 * len(MINILM_LAYERS))  # 112
    assert {copy[f"{layer}.U"].shape[1] for layer in MINILM_LAYERS} == {rank} == {112}
    full, sent = dense_residual(cumulative), dense_residual(copy)
    dropped = sum(np.sum((full[n].astype(np.float64) - sent[n]) ** 2) for n in full)
    total = sum(np.sum(full[n].astype(np.float64) ** 2) for n in full)
    assert 0.0 < error < 1.0
    assert error == pytest.approx(np.sqrt(dropped / total), rel=1e-3)


def test_an_oversized_global_raises_payload_too_large() -> None:
    # Prepare: a rank-300 step on every MiniLM layer (12·300·768·4 ≈ 11 MB)
    rng = np.random.default_rng(3)
    step = {layer: (rng.normal(size=(384, 300)).astype(np.float32),
                    rng.normal(size=(300, 384)).astype(np.float32)) for layer in MINILM_LAYERS}
    message = GlobalModel("fed", 5, "ab" * 32, minilm_adapter(rng), residual=True,
                          residual_step=residual_tensors(step))
    # Execute / Assert
    with pytest.raises(PayloadTooLarge) as caught:
        codec.encode_global(message)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in text
    assert str(MAX_PAYLOAD_BYTES) in text and "residual step" in text


def test_rank_caps_stop_each_layer_at_its_own_crossover() -> None:
    from aggregator.exact import rank_caps

    shapes = {"a": (4, 4), "b": (8, 8)}  # crossovers 16/8 = 2 and 64/16 = 4
    assert rank_caps(shapes, reserved_bytes=0, limit_bytes=10_000) == {"a": 2, "b": 4}
    # one rank of both layers costs 4·(8 + 16) = 96 bytes: 200 bytes hold rank 2 of each
    assert rank_caps(shapes, reserved_bytes=0, limit_bytes=200) == {"a": 2, "b": 2}
    # per-layer caps in a catch-up copy: "a" (rank 3 > its crossover: dense) is cut to 2,
    # "b" keeps its 3 (4·24·3 = 288 bytes of factors: over 250 only because of "a")
    rng = np.random.default_rng(0)
    inc = {name: (rng.standard_normal((d, 3)), rng.standard_normal((3, d)))
           for name, (d, _) in shapes.items()}
    total = accumulate_exact({}, inc)
    assert set(total) == {"a.dense", "b.U", "b.V"}
    copy, error = catch_up(total, reserved_bytes=0, limit_bytes=250)
    assert copy["a.U"].shape[1] == 2 and copy["b.U"].shape[1] == 2  # the payload rank is 2
    assert 0 < error < 1
