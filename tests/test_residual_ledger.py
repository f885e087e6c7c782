"""The cumulative residual of exact aggregation: rank budget, folding, wire form, payload limit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from aggregator.exact import (
    Folded,
    crossover_rank,
    dense,
    exact_aggregate,
    fold,
    rank_budget,
    residual_from_tensors,
    residual_nbytes,
    residual_tensors,
    scaled,
)
from protocol import codec
from protocol.codec import MAX_PAYLOAD_BYTES, PayloadTooLarge
from protocol.manifest import Manifest
from protocol.messages import GlobalModel

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


# --- fold -----------------------------------------------------------------------------------


def orthogonal_pair() -> tuple[dict, dict]:
    """R1 = 2·e0 f1ᵀ (σ = 2) and R2 = 3·e2 f0ᵀ (σ = 3) on a 3×4 layer: orthogonal directions."""
    cumulative = {"w": (2.0 * e(3, 0), 1.0 * e(4, 1).T)}
    increment = {"w": (1.5 * e(3, 2), 2.0 * e(4, 0).T)}
    return cumulative, increment


def test_fold_of_two_rank_one_residuals_is_their_exact_rank_two_sum() -> None:
    cumulative, increment = orthogonal_pair()
    # Execute
    folded = fold(cumulative, increment, max_rank=2)
    # Assert
    assert isinstance(folded, Folded)
    expected = dense(cumulative["w"]) + dense(increment["w"])
    np.testing.assert_allclose(dense(folded.residual["w"]), expected, atol=1e-6)
    assert folded.ranks == {"w": 2} and folded.residual["w"][0].shape == (3, 2)
    assert folded.truncation_error == 0.0


def test_fold_over_the_budget_keeps_the_larger_direction_and_reports_what_it_dropped() -> None:
    cumulative, increment = orthogonal_pair()
    # Execute
    folded = fold(cumulative, increment, max_rank=1)
    # Assert: the increment's σ = 3 direction survives, the cumulative's σ = 2 one is dropped
    np.testing.assert_allclose(dense(folded.residual["w"]), dense(increment["w"]), atol=1e-6)
    assert folded.ranks == {"w": 1}
    assert folded.truncation_error == pytest.approx(2.0 / np.sqrt(2.0**2 + 3.0**2), rel=1e-9)


def test_fold_error_is_over_all_layers_and_one_sided_layers_are_kept() -> None:
    # Prepare: layer "x" truncates (drops σ = 1 of σ = 1, 2), "y" is in the cumulative only
    # (σ = 2), "z" in the increment only (σ = 4).
    cumulative = {"x": (e(2, 0), e(2, 0).T), "y": (2.0 * e(2, 1), e(2, 0).T)}
    increment = {"x": (2.0 * e(2, 1), e(2, 1).T), "z": (4.0 * e(2, 0), e(2, 1).T)}
    # Execute
    folded = fold(cumulative, increment, max_rank=1)
    # Assert: ‖dropped‖² = 1, ‖exact‖² = 1 + 4 + 4 + 16
    assert folded.ranks == {"x": 1, "y": 1, "z": 1}
    np.testing.assert_allclose(dense(folded.residual["x"]), dense(increment["x"]), atol=1e-6)
    np.testing.assert_allclose(dense(folded.residual["y"]), dense(cumulative["y"]), atol=1e-6)
    np.testing.assert_allclose(dense(folded.residual["z"]), dense(increment["z"]), atol=1e-6)
    assert folded.truncation_error == pytest.approx(1.0 / 5.0, rel=1e-9)


def test_fold_drops_cancelled_directions_and_rejects_bad_input() -> None:
    u, v = np.ones((3, 1)), np.ones((1, 5))
    folded = fold({"w": (u, v)}, {"w": (-u, v)}, max_rank=3)
    assert folded.ranks == {"w": 0} and folded.truncation_error == 0.0
    assert fold({}, {}, max_rank=0) == Folded({}, 0.0, {})
    with pytest.raises(ValueError, match="max_rank"):
        fold({"w": (u, v)}, {}, max_rank=-1)
    with pytest.raises(ValueError, match="'w'"):
        fold({"w": (u, v)}, {"w": (np.ones((4, 1)), v)}, max_rank=2)


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
def test_thirty_rounds_of_minilm_globals_fit_the_payload_limit() -> None:
    # Prepare
    rng = np.random.default_rng(42)
    start = minilm_adapter(rng)
    budget = rank_budget(MINILM_LAYERS, adapter_bytes(start) + CODEC_MARGIN, MAX_PAYLOAD_BYTES)
    scaling = {layer: MINILM_ALPHA / MINILM_R for layer in MINILM_LAYERS}
    cumulative: dict = {}
    exact_sum = {layer: np.zeros(shape) for layer, shape in MINILM_LAYERS.items()}
    added_rank, sizes = 0, []
    for t in range(32):
        k = int(rng.integers(3, 11))
        updates = [(minilm_adapter(rng), float(rng.uniform(1.0, 100.0))) for _ in range(k)]
        adapter, res = exact_aggregate(updates)
        increment = scaled(res, scaling)
        before = {layer: dense(f) for layer, f in cumulative.items()}
        # Execute
        folded = fold(cumulative, increment, budget)
        payload = codec.encode_global(GlobalModel(
            "fed", t, "ab" * 32, adapter, base_residual=residual_tensors(folded.residual)))
        # Assert: random updates are in general position, so each round adds (K−1)·r to the rank
        added_rank += (k - 1) * MINILM_R
        sizes.append(len(payload))
        assert len(payload) <= MAX_PAYLOAD_BYTES
        assert folded.ranks == {layer: min(added_rank, budget) for layer in MINILM_LAYERS}
        for layer, (u, v) in folded.residual.items():
            assert u.shape == (384, folded.ranks[layer]) == v.T.shape
        if added_rank <= budget:  # nothing truncated yet: the sum of every increment, exactly
            assert folded.truncation_error == 0.0
            for layer, f in increment.items():
                exact_sum[layer] += dense(f)
                got = dense(folded.residual[layer])
                assert np.linalg.norm(got - exact_sum[layer]) <= 1e-5 * np.linalg.norm(
                    exact_sum[layer])
        else:  # the reported error is that of the kept factors against this fold's exact sum
            exact = {layer: before.get(layer, 0.0) + dense(f) for layer, f in increment.items()}
            dropped = sum(np.sum((exact[n] - dense(folded.residual[n])) ** 2) for n in exact)
            total = sum(np.sum(x**2) for x in exact.values())
            assert 0.0 < folded.truncation_error < 1.0
            assert folded.truncation_error == pytest.approx(np.sqrt(dropped / total), rel=1e-4)
        cumulative = folded.residual
    # Assert: the rank reached the budget and stayed there; devices read back the same factors
    assert added_rank > budget and set(folded.ranks.values()) == {budget}
    back = residual_from_tensors(codec.decode_global(payload).base_residual)
    for layer in MINILM_LAYERS:
        np.testing.assert_array_equal(back[layer][0], cumulative[layer][0])
    # the budget is used, not wasted (zstd shaves ~8% off normal float32 data)
    assert max(sizes) > 0.75 * MAX_PAYLOAD_BYTES


@pytest.mark.usefixtures("one_blas_thread")
def test_a_tighter_limit_binds_by_bytes() -> None:
    # 4 MiB: the budget (103) is set by bytes, and the encoded globals stay within them.
    rng = np.random.default_rng(7)
    limit = 4 * 1024 * 1024
    start = minilm_adapter(rng)
    budget = rank_budget(MINILM_LAYERS, adapter_bytes(start) + CODEC_MARGIN, limit)
    scaling = {layer: MINILM_ALPHA / MINILM_R for layer in MINILM_LAYERS}
    cumulative: dict = {}
    for t in range(3):
        updates = [(minilm_adapter(rng), 1.0 + k) for k in range(10)]  # +72 rank per round
        adapter, res = exact_aggregate(updates)
        cumulative = fold(cumulative, scaled(res, scaling), budget).residual
        payload = codec.encode_global(GlobalModel(
            "fed", t, "ab" * 32, adapter, base_residual=residual_tensors(cumulative)))
        assert len(payload) <= limit
    assert {u.shape[1] for u, _ in cumulative.values()} == {budget} == {103}


def test_an_oversized_global_raises_payload_too_large() -> None:
    # Prepare: rank 300 on every MiniLM layer (12·300·768·4 ≈ 11 MB), past what devices accept
    rng = np.random.default_rng(3)
    residual = {layer: (rng.normal(size=(384, 300)).astype(np.float32),
                        rng.normal(size=(300, 384)).astype(np.float32)) for layer in MINILM_LAYERS}
    message = GlobalModel("fed", 5, "ab" * 32, minilm_adapter(rng),
                          base_residual=residual_tensors(residual))
    # Execute / Assert
    with pytest.raises(PayloadTooLarge) as caught:
        codec.encode_global(message)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in text
    assert str(MAX_PAYLOAD_BYTES) in text and "base_residual" in text and "rank up to 300" in text
    # the same global within the budget encodes
    small = {layer: (u[:, :100], v[:100]) for layer, (u, v) in residual.items()}
    codec.encode_global(GlobalModel("fed", 5, "ab" * 32, message.adapter,
                                    base_residual=residual_tensors(small)))


def test_rank_caps_stop_each_layer_at_its_own_crossover() -> None:
    from aggregator.exact import rank_caps

    shapes = {"a": (4, 4), "b": (8, 8)}  # crossovers 16/8 = 2 and 64/16 = 4
    assert rank_caps(shapes, reserved_bytes=0, limit_bytes=10_000) == {"a": 2, "b": 4}
    # one rank of both layers costs 4·(8 + 16) = 96 bytes: 200 bytes hold rank 2 of each
    assert rank_caps(shapes, reserved_bytes=0, limit_bytes=200) == {"a": 2, "b": 2}
    # per-layer caps through fold: "a" is truncated at 2 while "b" keeps rank 3
    rng = np.random.default_rng(0)
    inc = {name: (rng.standard_normal((d, 3)), rng.standard_normal((3, d)))
           for name, (d, _) in shapes.items()}
    folded = fold({}, inc, {"a": 2, "b": 4})
    assert folded.ranks == {"a": 2, "b": 3}
    assert 0 < folded.truncation_error < 1
