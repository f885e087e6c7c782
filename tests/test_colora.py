"""CoLoRA: personal cores never leave the device, shared factors are averaged, S starts at I."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.personal import colora, is_personal, shared_part
from workloads.cnn import LORA_ALPHA, LORA_RANK, FmnistCnn
from workloads.colora import (
    CoLoraLinear,
    build_colora_cnn,
    load_tensors,
    personal_cores,
    restore_cores,
    save_cores,
    shared_adapter,
)
from workloads.lora import get_adapter


@pytest.fixture(scope="module")
def base_weights() -> Path:
    return FmnistCnn().base_weights()


def test_aggregate_holds_no_personal_keys_and_averages_the_shared_ones() -> None:
    # Two devices that forgot to filter: each sends its personal core S_i along with the shared
    # A (1×2), B (2×1) and head bias. The cores even differ in shape (a full 1×1 core and a
    # diagonal one), which FedAvg would reject if they were ever aggregated.
    device1 = {"fc1.lora_A.weight": np.array([[1.0, 3.0]], np.float32),
               "fc1.lora_S.weight": np.array([[1e6]], np.float32),
               "fc1.lora_B.weight": np.array([[2.0], [0.0]], np.float32),
               "head.bias": np.array([4.0], np.float32)}
    device2 = {"fc1.lora_A.weight": np.array([[5.0, -1.0]], np.float32),
               "fc1.lora_S.weight": np.array([-7.0], np.float32),
               "fc1.lora_B.weight": np.array([[0.0], [4.0]], np.float32),
               "head.bias": np.array([8.0], np.float32)}
    # Shared tensors, weighted by samples 1 and 3 (Σ = 4):
    #   A    = (1·[1, 3] + 3·[5, -1]) / 4 = [16, 0] / 4 = [4, 0]
    #   B    = (1·[2, 0] + 3·[0, 4]) / 4  = [2, 12] / 4 = [0.5, 3]
    #   bias = (1·4 + 3·8) / 4             = 28 / 4     = 7
    result = colora([(device1, 1.0), (device2, 3.0)])
    assert set(result) == {"fc1.lora_A.weight", "fc1.lora_B.weight", "head.bias"}
    np.testing.assert_array_equal(result["fc1.lora_A.weight"], [[4.0, 0.0]])
    np.testing.assert_array_equal(result["fc1.lora_B.weight"], [[0.5], [3.0]])
    np.testing.assert_array_equal(result["head.bias"], [7.0])
    # The uploads themselves are left as they were.
    assert set(device1) == {"fc1.lora_A.weight", "fc1.lora_S.weight", "fc1.lora_B.weight",
                            "head.bias"}


def test_shared_part_drops_only_personal_keys() -> None:
    adapter = {"fc1.lora_A.weight": np.ones((1, 2), np.float32),
               "fc1.lora_S.weight": np.ones((1, 1), np.float32),
               "fc2.lora_S.weight": np.ones(1, np.float32),
               "head.weight": np.ones((3, 5), np.float32)}
    assert set(shared_part(adapter)) == {"fc1.lora_A.weight", "head.weight"}
    assert set(shared_part(adapter, personal=("lora_S", "head"))) == {"fc1.lora_A.weight"}


def test_personal_filter_matches_path_segments_only() -> None:
    assert is_personal("fc1.lora_S.weight")
    assert not is_personal("fc1.lora_A.weight")
    assert not is_personal("lora_Shared.weight")
    assert is_personal("head.weight", personal=("lora_S", "head"))
    with pytest.raises(ValueError, match="personal"):
        colora([({"fc1.lora_S.weight": np.eye(2, dtype=np.float32)}, 1.0)])


def test_colora_linear_computes_w0x_plus_s_b_s_a_x() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = CoLoraLinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer.lora_S.weight, torch.eye(3))
    torch.testing.assert_close(layer(x), base(x))  # B = 0: starts as the frozen layer
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_S.weight.normal_()
    a, b, s = layer.lora_A.weight, layer.lora_B.weight, layer.lora_S.weight
    expected = base(x) + 2.0 * x @ a.T @ s.T @ b.T
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad


def test_device_model_uploads_only_shared_tensors(base_weights: Path) -> None:
    model = build_colora_cnn(base_weights, seed=0)
    upload = shared_adapter(model)
    assert set(upload) == {"fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight",
                           "fc2.lora_B.weight", "head.weight", "head.bias"}
    cores = personal_cores(model)
    assert set(cores) == {"fc1.lora_S.weight", "fc2.lora_S.weight"}
    assert all(is_personal(k) for k in cores) and not any(is_personal(k) for k in upload)
    np.testing.assert_array_equal(cores["fc1.lora_S.weight"], np.eye(LORA_RANK))
    assert model.fc1.scaling == LORA_ALPHA / LORA_RANK
    # two devices built with one seed start from the same shared adapter
    other = shared_adapter(build_colora_cnn(base_weights, seed=0))
    for key, value in upload.items():
        np.testing.assert_array_equal(other[key], value)


def test_cores_train_persist_and_survive_a_new_global(base_weights: Path, tmp_path: Path) -> None:
    # Prepare: a few SGD steps on one device
    model = build_colora_cnn(base_weights, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,))
    for _ in range(5):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    trained = personal_cores(model)
    assert not np.allclose(trained["fc1.lora_S.weight"], np.eye(LORA_RANK))
    # Execute: persist, receive a new global (shared only), rebuild the device and restore
    path = tmp_path / "device-3" / "colora_cores.safetensors"
    save_cores(model, path)
    fresh = build_colora_cnn(base_weights, seed=0)
    assert not restore_cores(fresh, tmp_path / "missing.safetensors")
    assert restore_cores(fresh, path)
    global_shared = colora([(get_adapter(model), 3.0), (get_adapter(fresh), 1.0)])
    load_tensors(fresh, global_shared, cores=False)
    # Assert: the cores are the trained ones; the shared tensors are the global's
    for key, value in personal_cores(fresh).items():
        np.testing.assert_array_equal(value, trained[key])
    for key, value in shared_adapter(fresh).items():
        np.testing.assert_array_equal(value, global_shared[key])
    with pytest.raises(ValueError, match="names differ"):
        load_tensors(fresh, global_shared, cores=True)


def test_diagonal_cores_are_vectors(base_weights: Path) -> None:
    model = build_colora_cnn(base_weights, seed=0, diagonal=True)
    cores = personal_cores(model)
    assert cores["fc2.lora_S.weight"].shape == (LORA_RANK,)
    np.testing.assert_array_equal(cores["fc2.lora_S.weight"], np.ones(LORA_RANK))
