"""The simulator: same function as the full models, exact catch-up, and a sane quick table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.__main__ import main
from experiments.data import GROUP_OF_CLASS, Features, load_features, task_labels, trunk_features
from experiments.federation import Device, GlobalFederation, SimConfig
from experiments.models import MODEL_KINDS, build, logits
from experiments.report import Column, RunResult, table
from workloads.cnn import FmnistCnn
from workloads.lora import get_adapter, set_adapter


@pytest.fixture(scope="module")
def base_weights() -> Path:
    return FmnistCnn().base_weights()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_features_path_equals_the_full_model(kind: str, base_weights: Path) -> None:
    # Prepare: a trained-looking adapter, so LoRA, gates and cores all matter
    model = build(kind, base_weights, seed=0)
    rng = np.random.default_rng(0)
    set_adapter(model, {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                        for k, v in get_adapter(model).items()})
    x, _ = FmnistCnn().example_batch(16)
    # Execute / Assert
    with torch.no_grad():
        torch.testing.assert_close(logits(model, trunk_features(base_weights, x.numpy())), model(x),
                                   atol=1e-5, rtol=1e-5)


def test_exact_devices_that_skip_rounds_catch_up(base_weights: Path) -> None:
    # Prepare: half the devices per round, so most devices miss some rounds
    config = SimConfig(devices=4, rounds=1, local_steps=2, participation=0.5)
    train, _ = load_features(base_weights, 600, 10, seed=0)
    devices = [Device(i, train.subset(np.arange(i, 600, 4)), train.y[i::4]) for i in range(4)]
    fed = GlobalFederation(build("lora", base_weights, seed=0), config, "exact")
    rng = np.random.default_rng(0)
    # Execute
    for _ in range(5):
        fed.round(devices, rng)
    for device in devices:
        fed._catch_up(device.index)
    # Assert: every device's frozen weights equal the server's, and the residual is not zero
    for weights in fed.device_w0.values():
        for name, w in weights.items():
            np.testing.assert_allclose(w, fed.server_w0[name], atol=1e-6)
    assert not np.allclose(fed.server_w0["fc1"], fed.pretrained_w0["fc1"])
    assert all(r > 0 for r in fed.residual_ratio)


def test_group_labelling_conflicts_with_type_on_most_classes() -> None:
    classes = np.arange(10)
    assert set(task_labels("group", classes)) == {0, 1, 2, 3}
    assert np.sum(task_labels("group", classes) == classes) == 2
    assert GROUP_OF_CLASS.shape == (10,)
    with pytest.raises(ValueError, match="task"):
        task_labels("colour", classes)


def test_table_pools_seeds_and_marks_missing_values() -> None:
    runs = [RunResult("A", [0.5, 0.7, 0.6], 0.6, np.array([0.5, 0.7]), 100.0, 200.0),
            RunResult("A", [0.4, 0.8], 0.8, np.array([0.6, 0.9]), 100.0, 200.0, {"x": 1.0})]
    text = table(runs)
    assert "| A | 0.700 ± 0.141 | 0.675 ± 0.106 | 0.550 ± 0.071 | 2.0 | 100 | 200 |" in text
    assert runs[0].rounds_to_best == 2
    assert table(runs, [Column("x", "x")]).endswith("| A | — |")
    assert table(runs[1:], [Column("x", "x")]).endswith("| A | 1.000 |")


def test_quick_run_writes_a_sane_table(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "RESULTS.md"
    assert main(["--quick", "--out", str(out), "--json", str(tmp_path / "summary.json")]) == 0
    # Assert: every setting and method is there, with numbers in range
    text = out.read_text()
    for heading in ("Dirichlet α = 0.1", "Dirichlet α = 0.5", "Class-incremental",
                    "Multi-task", "What is a reconstruction", "CPU cores"):
        assert heading in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"dirichlet-0.1", "dirichlet-0.5", "incremental", "multitask"}
    for setting, methods in summary.items():
        for method, numbers in methods.items():
            assert f"| {method} |" in text
            assert 0.1 < numbers["test_accuracy"] <= 1.0, (setting, method)  # 0.1: chance
            assert 0.0 <= numbers["worst_device"] <= numbers["mean_device"] <= 1.0
    dirichlet = summary["dirichlet-0.5"]
    fedavg = dirichlet["FedAvg (= FLORA aggregation)"]
    exact = dirichlet["Exact (FedEx-LoRA residual)"]
    assert fedavg["test_accuracy"] > 0.5  # the pretrained features make 10 classes easy
    assert exact["bytes_down"] > fedavg["bytes_down"] == fedavg["bytes_up"] > 0
    assert 0.0 < exact["residual_ratio"] < 1.0
    # masking the other tasks' logits is what stops the head from forgetting old classes
    incremental = summary["incremental"]
    assert incremental["FedAvg + logit mask"]["forgetting"] < incremental["FedAvg"]["forgetting"]
    multitask = summary["multitask"]
    # two tasks, K = 2: every device with its own task (best matching), not the ≥ 0.5 any
    # two-cluster labelling gets for free
    assert multitask["FL-TAC (K = 2 clusters)"]["cluster_agreement"] == 1.0
    assert (multitask["CoLoRA + personal head"]["bytes_up"]
            < multitask["FedAvg (one shared adapter)"]["bytes_up"])


def test_features_subset_keeps_rows_and_labels() -> None:
    data = Features(torch.arange(12.0).reshape(6, 2), np.arange(6))
    part = data.subset(np.array([1, 4]))
    np.testing.assert_array_equal(part.y, [1, 4])
    torch.testing.assert_close(part.x, torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
