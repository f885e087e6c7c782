"""FedSQ: gates come from the frozen structural copy, and the model trains under ExecuTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.strategies import fedavg
from protocol.tensors import canonical_key
from workloads.cnn import FmnistCnn
from workloads.fedsq import FmnistFedSq, build_fedsq
from workloads.lora import get_adapter, set_adapter


@pytest.fixture(scope="module")
def base_weights() -> Path:
    return FmnistCnn().base_weights()


def perturbed(model: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """The model's adapter with every tensor moved randomly (B ≠ 0, so Q differs from S)."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in get_adapter(model).items()}


def test_fedsq_adapter_matches_the_cnn_and_starts_equal_to_it(base_weights: Path) -> None:
    fedsq, plain = build_fedsq(base_weights, seed=3), FmnistCnn().build(base_weights, seed=3)
    a, b = get_adapter(fedsq), get_adapter(plain)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    x, _ = FmnistCnn().example_batch(8)
    # B = 0, so Q equals S and S's gates equal Q's own ReLUs: the same function as the plain CNN
    torch.testing.assert_close(fedsq(x), plain(x))
    assert FmnistFedSq().build(base_weights, seed=3).peft_config["default"].r == 4
    trainable = {canonical_key(n) for n, p in fedsq.named_parameters() if p.requires_grad}
    assert not any("structure" in k for k in trainable)


def test_gates_come_from_the_structural_copy(base_weights: Path) -> None:
    # Prepare
    model = build_fedsq(base_weights, seed=0)
    set_adapter(model, perturbed(model, 1))
    inner = model.base_model.model
    x, _ = FmnistCnn().example_batch(16)
    # Execute
    with torch.no_grad():
        feats = inner.features(x)
        s1 = inner.structure.fc1(feats)
        s2 = inner.structure.fc2(torch.relu(s1))
        q1 = (s1 > 0) * inner.fc1(feats)
        expected = inner.head((s2 > 0) * inner.fc2(q1))
        relu_q = inner.head(torch.relu(inner.fc2(torch.relu(inner.fc1(feats)))))
        got = model(x)
    # Assert: S gates Q; with Q ≠ S that differs from Q's own ReLUs
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, relu_q, atol=1e-3)


def test_only_q_trains_and_fedavg_applies(base_weights: Path) -> None:
    model = build_fedsq(base_weights, seed=0)
    set_adapter(model, perturbed(model, 2))
    structure = model.base_model.model.structure
    structure_before = {k: v.clone() for k, v in structure.state_dict().items()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = FmnistCnn().example_batch(32)
    for _ in range(3):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    for key, value in model.base_model.model.structure.state_dict().items():
        torch.testing.assert_close(value, structure_before[key], rtol=0, atol=0)
    averaged = fedavg([(get_adapter(model), 2.0), (perturbed(model, 3), 1.0)])
    set_adapter(model, averaged)  # the FedAvg result loads back into the same model


def test_executorch_forward_backward_matches_eager(base_weights: Path, tmp_path: Path) -> None:
    from executorch.extension.training import (
        _load_for_executorch_for_training,
        get_sgd_optimizer,
    )

    from export.executorch_export import export_pte, zero_frozen_inputs

    # Prepare: a non-trivial adapter, so the gates and LoRA gradients are all exercised
    model = build_fedsq(base_weights, seed=0)
    set_adapter(model, perturbed(model, 4))
    x, y = FmnistCnn().example_batch(32)
    path = tmp_path / "fedsq.pte"
    # Execute: torch.export -> _export_forward_backward -> to_edge -> to_executorch
    frozen = export_pte(model, (x, y), path)
    # Q's LoRA layers (the regex target leaves the structural copy's fc1/fc2 alone) + the bias
    assert [spec.name for spec in frozen] == ["fc1", "fc2", "logit_bias"]
    program = _load_for_executorch_for_training(str(path))
    loss, logits, *_ = program.forward_backward("forward", (x, y, *zero_frozen_inputs(frozen)))
    gradients = {canonical_key(n): g.clone() for n, g in program.named_gradients().items()}
    optimiser = get_sgd_optimizer(program.named_parameters(), 0.05, 0.0, 0.0, 0.0, False)
    optimiser.step(program.named_gradients())
    stepped = {canonical_key(n): t.detach().numpy().copy()
               for n, t in program.named_parameters().items()}
    # eager reference: one SGD step exactly like edge_client/backends/torch_backend.py
    eager_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    eager_opt.zero_grad()
    eager_logits = model(x)
    eager_loss = torch.nn.functional.cross_entropy(eager_logits, y)
    eager_loss.backward()
    eager_grads = {canonical_key(n): p.grad.clone() for n, p in model.named_parameters()
                   if p.requires_grad}
    eager_opt.step()
    # Assert
    assert abs(float(loss) - eager_loss.item()) < 1e-5
    # logits differ by float32 summation order only (1568-long dot products)
    torch.testing.assert_close(logits, eager_logits.detach(), atol=1e-4, rtol=1e-4)
    assert set(gradients) == set(eager_grads)
    for key, grad in gradients.items():
        torch.testing.assert_close(grad, eager_grads[key], atol=1e-5, rtol=1e-4)
    for key, value in get_adapter(model).items():
        np.testing.assert_allclose(stepped[key], value, atol=1e-6)
