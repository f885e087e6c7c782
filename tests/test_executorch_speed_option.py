"""The XNNPACK-delegated ExecuTorch training program computes what eager PyTorch computes.

export_pte(..., delegate="xnnpack") is 35-55x faster than the portable lowering (docs/
EXECUTORCH_SPEED.md); these tests hold it to eager on loss, gradients and several SGD steps (a
trainable weight frozen into a delegate would pass one step and fail the next), and with the
frozen inputs (LoRA base deltas, logit bias) set as well as at zero. No timing asserts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export.executorch_export import (
    DELEGATES,
    export_pte,
    frozen_overrides,
    training_program,
    zero_frozen_inputs,
)
from protocol.manifest import BASE_DELTA, LOGIT_BIAS, FrozenInput
from protocol.tensors import canonical_key
from workloads.lora import set_adapter
from workloads.registry import get_workload

# Measured: CNN loss 5e-7, gradients 2.9e-6 (of magnitude ~10), adapter after 3 steps 2.2e-7;
# MiniLM loss 0, gradients 1.5e-7, adapter 3e-8.
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
PARAM_ATOL = 1e-6
LEARNING_RATE = 0.05
STEPS = 3


def _cnn() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], list]:
    workload = get_workload("fmnist-cnn")
    model = workload.build(workload.base_weights(), seed=0)
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((32, 1, 28, 28)).astype(np.float32),
                rng.integers(0, 10, 32).astype(np.int64)) for _ in range(STEPS)]
    return model, workload.example_batch(32), batches


def _small_minilm() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], list]:
    """MiniLM cut to one encoder layer, batch 2: every op kind of the full model, exported fast."""
    from workloads import fortunes

    workload = get_workload("minilm-fortunes")
    model = workload.build(workload.base_weights(), seed=0)
    model.base_model.model.bert.encoder.layer = model.base_model.model.bert.encoder.layer[:1]
    texts, labels = fortunes.load_fortunes(workload.labels)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(STEPS):
        index = rng.choice(len(texts), 2, replace=False)
        ids = workload.tokenize([texts[i] for i in index])
        batches.append((ids, labels[index].astype(np.int64)))
    return model, workload.example_batch(2), batches


CASES = {"fmnist-cnn": _cnn, "minilm-1layer": _small_minilm}


class Program:
    """The exported program run the way edge_client's ExecuTorch backend runs it."""

    def __init__(self, path: Path, example: tuple[torch.Tensor, torch.Tensor],
                 frozen: tuple[FrozenInput, ...] = ()) -> None:
        from executorch.extension.training import (
            _load_for_executorch_for_training,
            get_sgd_optimizer,
        )

        self.module = _load_for_executorch_for_training(str(path))
        self.frozen = zero_frozen_inputs(frozen)  # what the device passes without overrides
        self.module.forward_backward("forward", (torch.zeros_like(example[0]),
                                                 torch.zeros_like(example[1]), *self.frozen))
        self.params = {canonical_key(n): t for n, t in self.module.named_parameters().items()}
        self.optimizer = get_sgd_optimizer(self.module.named_parameters(), LEARNING_RATE,
                                           0.0, 0.0, 0.0, False)

    def set_adapter(self, adapter: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, tensor in self.params.items():
                tensor.copy_(torch.from_numpy(adapter[key]))

    def _run(self, x: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
        return self.module.forward_backward("forward", (torch.from_numpy(x), torch.from_numpy(y),
                                                        *self.frozen))

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        loss, *_ = self._run(x, y)
        return float(loss), {canonical_key(n): g.numpy().copy()
                             for n, g in self.module.named_gradients().items()}

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        loss, *_ = self._run(x, y)
        self.optimizer.step(self.module.named_gradients())
        return float(loss)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {canonical_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def _perturbed_adapter(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """peft starts B at zero (then every A gradient is zero): perturb B and the head."""
    rng = np.random.default_rng(7)
    return {k: p.detach().numpy().copy() if ".lora_A." in k
            else (p.detach().numpy() + rng.normal(0.0, 0.05, p.shape)).astype(np.float32)
            for k, p in _trainable(model).items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):  # noqa: ANN001, ANN201
    model, example, batches = CASES[request.param]()
    path = tmp_path_factory.mktemp("pte") / f"{request.param}.pte"
    frozen = export_pte(model, example, path, delegate="xnnpack")
    return model, example, batches, path, frozen


def _same_start(case):  # noqa: ANN001, ANN202
    """The program and the eager model, both loaded with the same perturbed adapter."""
    model, example, batches, path, frozen = case
    program = Program(path, example, frozen)
    adapter = _perturbed_adapter(model)
    program.set_adapter(adapter)
    set_adapter(model, adapter)
    return model, batches, program, _trainable(model), adapter


def test_loss_and_gradients_match_eager(case) -> None:  # noqa: ANN001
    model, batches, program, params, _ = _same_start(case)
    x, y = batches[0]
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    got_loss, got = program.gradients(x, y)
    assert got_loss == pytest.approx(loss.item(), abs=LOSS_ATOL)
    assert set(got) == set(params)  # every trainable tensor, and only those, is a program parameter
    for key, p in params.items():
        np.testing.assert_allclose(got[key], p.grad.numpy(), atol=GRAD_ATOL, err_msg=key)
    assert any(np.abs(p.grad.numpy()).max() > 1e-4 for k, p in params.items() if ".lora_A." in k)
    model.zero_grad()


def test_sgd_steps_match_eager(case) -> None:  # noqa: ANN001
    """Weights a delegate had copied in as constants would make steps 2+ drift from eager."""
    model, batches, program, params, adapter = _same_start(case)
    optimizer = torch.optim.SGD(params.values(), lr=LEARNING_RATE)
    for x, y in batches:
        optimizer.zero_grad()
        want = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        want.backward()
        optimizer.step()
        assert program.step(x, y) == pytest.approx(want.item(), abs=LOSS_ATOL)
    for key, p in params.items():
        after = program.params[key].detach().numpy()
        np.testing.assert_allclose(after, p.detach().numpy(), atol=PARAM_ATOL, err_msg=key)
        assert np.abs(after - adapter[key]).max() > 0, f"{key} did not train"


def _random_frozen(frozen: tuple[FrozenInput, ...]) -> tuple[torch.Tensor, ...]:
    """A random delta per LoRA layer (W0 entries are ~0.03-0.1) and a random logit bias.

    (A class mask's -1e4 would put the loss of a masked label at ~1e4, beyond float32's 1e-5.)
    """
    generator = torch.Generator().manual_seed(5)
    scale = {BASE_DELTA: 0.02, LOGIT_BIAS: 0.5}
    return tuple(scale[spec.kind] * torch.randn(spec.shape, generator=generator)
                 for spec in frozen)


def _eager_with(model: torch.nn.Module, values: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    """A copy of `model` with the overrides written into its parameters (as torch_backend does)."""
    eager = copy.deepcopy(model)
    eager.zero_grad(set_to_none=True)  # deepcopy copies the .grad earlier tests left behind
    params = dict(eager.named_parameters())
    with torch.no_grad():
        for override, value in zip(frozen_overrides(eager), values, strict=True):
            if override.spec.kind == BASE_DELTA:
                params[override.parameter].add_(value)
            else:
                params[override.parameter].copy_(value)
    return eager


def test_frozen_inputs_match_eager_with_the_same_overrides(case) -> None:  # noqa: ANN001
    model, batches, program, _, _ = _same_start(case)
    frozen = case[4]
    # CNN: fc1, fc2 and the logit bias; MiniLM: layer 0's query and value (it has no logit bias)
    assert [spec.kind for spec in frozen].count(BASE_DELTA) == 2
    program.frozen = _random_frozen(frozen)
    eager = _eager_with(model, program.frozen)
    params = _trainable(eager)
    x, y = batches[0]
    logits = eager(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    got_loss, got_logits, *_ = program._run(x, y)
    _, got = program.gradients(x, y)
    assert float(got_loss) == pytest.approx(loss.item(), abs=LOSS_ATOL)
    # relative too: on the CNN's random-noise batches logits and gradients reach ~100
    np.testing.assert_allclose(got_logits.numpy(), logits.detach().numpy(), rtol=1e-5,
                               atol=LOSS_ATOL)
    for key, p in params.items():
        np.testing.assert_allclose(got[key], p.grad.numpy(), rtol=1e-5, atol=GRAD_ATOL,
                                   err_msg=key)
    # the overrides matter: at zero the program computes other logits
    program.frozen = zero_frozen_inputs(frozen)
    _, plain_logits, *_ = program._run(x, y)
    assert np.abs(plain_logits.numpy() - got_logits.numpy()).max() > 1e-2


def test_xnnpack_program_is_delegated_and_keeps_trainables_outside() -> None:
    from executorch.exir.lowered_backend_module import get_lowered_backend_modules

    model, example, _ = _cnn()
    program = training_program(model, example, "xnnpack").exported_program()
    lowered = get_lowered_backend_modules(program.graph_module)
    assert lowered and all(m.backend_id == "XnnpackBackend" for m in lowered)
    trainable = {f"m.{n}" for n, p in model.named_parameters() if p.requires_grad}
    for module in lowered:
        assert not trainable & set(module.original_module.state_dict)
    # the frozen convolutions, the pools and the matmuls all run in XNNPACK
    targets = {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}
    for op in ("convolution", "max_pool2d", "addmm", ".mm."):
        assert not any(op in t for t in targets), op


class _TrainableConv(torch.nn.Module):
    """A trainable convolution: XNNPACK's stock partitioner copies its weight into the delegate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_trainable_weights_stay_out_of_delegates(tmp_path: Path) -> None:
    """The stock XnnpackPartitioner bakes the trainable conv weight into the delegate (measured:
    step 1 right, steps 2-3 drift from eager by 0.16); the training partitioner leaves it out."""
    torch.manual_seed(0)
    model = _TrainableConv()
    example = (torch.randn(2, 1, 8, 8), torch.tensor([0, 2]))
    path = tmp_path / "conv.pte"
    export_pte(model, example, path, delegate="xnnpack")
    program = Program(path, example)
    optimizer = torch.optim.SGD(_trainable(model).values(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([1, 2])
        optimizer.zero_grad()
        want = torch.nn.functional.cross_entropy(model(x), y)
        want.backward()
        optimizer.step()
        assert program.step(x.numpy(), y.numpy()) == pytest.approx(want.item(), abs=LOSS_ATOL)
    for key, p in _trainable(model).items():
        np.testing.assert_allclose(program.params[key].numpy(), p.detach().numpy(),
                                   atol=PARAM_ATOL, err_msg=key)


def test_portable_lowering_is_still_available(tmp_path: Path) -> None:
    model, example, batches = _cnn()
    path = tmp_path / "portable.pte"
    frozen = export_pte(model, example, path, delegate="portable")
    program = Program(path, example, frozen)
    x, y = batches[0]
    for values in (program.frozen, _random_frozen(frozen)):  # frozen inputs at zero, then set
        program.frozen = values
        got_loss, _ = program.gradients(x, y)
        with torch.no_grad():
            eager_logits = _eager_with(model, values)(torch.from_numpy(x))
            want = torch.nn.functional.cross_entropy(eager_logits, torch.from_numpy(y))
        assert got_loss == pytest.approx(want.item(), abs=LOSS_ATOL)
    assert "xnnpack" in DELEGATES and "portable" in DELEGATES
    with pytest.raises(ValueError, match="unknown delegate"):
        export_pte(model, example, tmp_path / "x.pte", delegate="vulkan")


def test_gelu_phi_rewrite_is_exact_in_float32() -> None:
    """Phi(x) = (x*gelu(x) + t/2) / (x*x + t), the erf-free form the xnnpack lowering uses."""
    from export.executorch_export import _PHI_TINY

    x = torch.cat([torch.linspace(-12.0, 12.0, 200_001),
                   torch.tensor([0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-20, -1e-20, 3e-8, 50.0,
                                 -50.0, 1e4, -1e4])])
    phi = (x * torch.nn.functional.gelu(x) + _PHI_TINY / 2) / (x * x + _PHI_TINY)
    exact = 0.5 * (1 + torch.erf(x.double() / math.sqrt(2.0)))
    assert not phi.isnan().any()
    assert (phi.double() - exact).abs().max().item() < 5e-7
