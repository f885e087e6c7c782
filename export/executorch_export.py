"""ExecuTorch training program: a joint forward/backward graph lowered to a .pte file.

Two lowerings (docs/EXECUTORCH_SPEED.md has the measurements):

- "xnnpack" (default): the joint graph is partitioned for the XNNPACK delegate, with two rules that
  keep training correct: no delegated subgraph ever owns a *trainable* parameter (those stay program
  parameters that the optimizer updates in place and enter the delegates as runtime inputs), and
  matrix multiplications take their weights at run time (XNNPACK's dynamic fully-connected), so
  a LoRA factor, a gradient or an activation can be either operand. Two graph rewrites let more of
  the backward run in XNNPACK: max_pool2d without its unused indices, and the GELU backward's
  0.5 * (1 + erf(x / sqrt 2)) computed from the forward's gelu(x) (erf only has a slow portable
  kernel). Loss and gradients match eager PyTorch to ~1e-6.
- "portable": the original `to_edge(...).to_executorch()` path (ExecuTorch's kernel library only):
  ~20x (CNN) to ~30x (MiniLM) slower than eager on one core.

Frozen inputs: a .pte holds frozen weights as constants, so the overrides a device must apply to
them are program inputs after (inputs, labels): one delta per LoRA layer, the frozen weight used
being W0 + delta (exact aggregation's residual), and the logit bias if the model has one (class
masks). `frozen_inputs(model)` lists them in program order; the manifest records the list. Zeros
leave the model as exported.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protocol.manifest import BASE_DELTA, LOGIT_BIAS, FrozenInput
from protocol.tensors import canonical_key

DELEGATES = ("xnnpack", "portable")
DEFAULT_DELEGATE = "xnnpack"


@dataclass(frozen=True, slots=True)
class FrozenOverride:
    """A frozen input of the program and the model parameter it overrides."""

    spec: FrozenInput
    parameter: str  # native name of the overridden parameter inside the model


_BASE_WEIGHT_SUFFIX = ".base_layer.weight"


def frozen_overrides(model: nn.Module) -> tuple[FrozenOverride, ...]:
    """The frozen inputs the program of `model` takes, in program order.

    LoRA layers are found in the model itself (modules with a `base_layer` and `lora_A`, as peft's
    and CoLoRA's layers have), not from the LoRA config, whose targets may be a regular
    expression. Only linear base layers count: a residual is a (d_out, d_in) matrix.
    """
    overrides = []
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear) and hasattr(module, "lora_A"):
            native = f"{name}{_BASE_WEIGHT_SUFFIX}"
            layer = canonical_key(native).removesuffix(_BASE_WEIGHT_SUFFIX)
            spec = FrozenInput(layer, BASE_DELTA, tuple(base.weight.shape))
            overrides.append(FrozenOverride(spec, native))
    for name, param in model.named_parameters():
        if canonical_key(name) == LOGIT_BIAS and not param.requires_grad:
            overrides.append(FrozenOverride(FrozenInput(LOGIT_BIAS, LOGIT_BIAS,
                                                        tuple(param.shape)), name))
    return tuple(overrides)


def frozen_inputs(model: nn.Module) -> tuple[FrozenInput, ...]:
    """What the manifest records about the program's frozen inputs (see frozen_overrides)."""
    return tuple(o.spec for o in frozen_overrides(model))


def zero_frozen_inputs(specs: Sequence[FrozenInput]) -> tuple[torch.Tensor, ...]:
    """The neutral value of every frozen input: the model as exported."""
    return tuple(torch.zeros(spec.shape, dtype=torch.float32) for spec in specs)


class TrainStep(nn.Module):
    """Model + cross-entropy. The first output must be the loss for the joint-graph export.

    With overrides, forward takes one frozen input per override after (inputs, labels) and runs
    the model with each LoRA layer's frozen weight at W0 + delta and the logit bias replaced.
    """

    def __init__(self, model: nn.Module, overrides: Sequence[FrozenOverride] = ()) -> None:
        super().__init__()
        self.m = model  # short prefix: ExecuTorch names parameters "m.<peft name>"
        self.overrides = tuple(overrides)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor,
                *frozen: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.overrides:
            replaced = self._replaced_parameters(frozen)
            logits = torch.func.functional_call(self.m, replaced, (inputs,))
        else:
            logits = self.m(inputs)
        # logits come out detached so devices can measure accuracy from the same call.
        return nn.functional.cross_entropy(logits, labels), logits.detach()

    def _replaced_parameters(self, frozen: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Native parameter name -> the tensor used for it: W0 + delta, or the new logit bias
        (replaced whole, as the torch and ONNX Runtime backends overwrite theirs)."""
        replaced = {}
        for override, tensor in zip(self.overrides, frozen, strict=True):
            if override.spec.kind == BASE_DELTA:
                # Looked up at call time, not cached: export swaps in its own parameter tensors,
                # and W0 must stay a (constant) parameter of the graph, not a captured tensor.
                tensor = self.m.get_parameter(override.parameter) + tensor
            replaced[override.parameter] = tensor
        return replaced


def export_pte(
    model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], out: Path,
    delegate: str = DEFAULT_DELEGATE, with_frozen_inputs: bool = True,
) -> tuple[FrozenInput, ...]:
    """Write a .pte whose "forward" method returns (loss, logits) and the adapter gradients.

    Args:
        model: The LoRA-wrapped model; parameters with requires_grad are the trained ones.
        example: (inputs, labels) with the static shapes the program will take.
        out: Where the .pte goes.
        delegate: "xnnpack" (fast, default) or "portable" (ExecuTorch kernels only).
        with_frozen_inputs: False compiles every frozen weight in as it is: the program takes
            (inputs, labels) only, as exports made before frozen inputs did.

    Returns:
        The program's inputs after (inputs, labels), in order (for the manifest).
    """
    program = training_program(model, example, delegate, with_frozen_inputs)
    out.write_bytes(program.buffer)
    return frozen_inputs(model) if with_frozen_inputs else ()


def training_program(
    model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], delegate: str = DEFAULT_DELEGATE,
    with_frozen_inputs: bool = True,
):  # -> executorch.exir.ExecutorchProgramManager (kept lazy: heavy import)
    """The lowered joint forward/backward program (what export_pte writes)."""
    if delegate not in DELEGATES:
        raise ValueError(f"unknown delegate {delegate!r}; choose from {DELEGATES}")
    from executorch.exir import to_edge, to_edge_transform_and_lower
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    overrides = frozen_overrides(model) if with_frozen_inputs else ()
    frozen = zero_frozen_inputs([o.spec for o in overrides])
    # 1. capture the training step; strict=False because HF models do not trace strictly. The
    #    frozen inputs are user inputs that need no gradient: the backward leaves them alone.
    program = export(TrainStep(model, overrides), (*example, *frozen), strict=False)
    # 2. add the backward pass: gradients for parameters with requires_grad (the adapter only)
    program = _export_forward_backward(program)
    if delegate == "portable":
        # 3-4. lower to the edge dialect and to an ExecuTorch program (portable kernels)
        return to_edge(program).to_executorch()
    # 3. rewrites that let XNNPACK take more of the backward (exact up to float32 rounding)
    _max_pool_without_indices(program)
    _gelu_backward_without_erf(program)
    # 4. partition for XNNPACK (trainable parameters never inside a delegate), then lower
    edge = to_edge_transform_and_lower(program, partitioner=[training_partitioner()])
    return edge.to_executorch()


def trainable_placeholders(program: torch.export.ExportedProgram) -> set[str]:
    """Graph names of the parameters the joint graph returns gradients for."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = program.graph_signature
    trained = {spec.target for spec in signature.output_specs
               if spec.kind == OutputKind.GRADIENT_TO_PARAMETER}
    return {spec.arg.name for spec in signature.input_specs
            if spec.kind == InputKind.PARAMETER and spec.target in trained}


def training_partitioner():  # -> XnnpackPartitioner (kept lazy: heavy import)
    """An XNNPACK partitioner fit for a training graph.

    - A partition that would contain a trainable parameter's placeholder is refused. A tagged
      parameter is *copied into the delegate* as a constant: the optimizer's in-place updates would
      never reach it (correct first step, wrong ever after). Untagged, the parameter stays a
      program parameter and the delegate reads it as a runtime input.
    - addmm / mm / linear take their weight (and bias) at run time: in a joint graph the "weight"
      of a matmul is often a gradient or an activation, and the LoRA factors must stay inputs.
      Convolutions keep static weights (the frozen backbone; XNNPACK needs them static).
    - clone / _clone_dim_order are left out: ExecuTorch 1.5.1's lowering removes a clone inside a
      partition and then lists the cloned node twice among the delegate outputs, which XNNPACK's
      preprocess rejects ("Output node ... is already in the inputs").
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import (
        AddmmConfig,
        LinearConfig,
        MMConfig,
    )
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    skipped = {"clone.default", "_clone_dim_order.default"}
    dynamic_gemms = (AddmmConfig, MMConfig, LinearConfig)
    configs = [c for c in ALL_PARTITIONER_CONFIGS
               if c.target_name not in skipped and c not in dynamic_gemms]
    partitioner = XnnpackPartitioner(configs=configs, config_precisions=ConfigPrecisionType.FP32)
    for cls in dynamic_gemms:
        config = cls(force_non_static_weights_for_f32_linear=True)
        config.set_enabled_precision_types([ConfigPrecisionType.FP32])
        partitioner.target_partitioner_configs[cls.target_name] = config

    for config in partitioner.target_partitioner_configs.values():
        def get_partition(node, program, _inner=config.get_partition):  # noqa: ANN001, ANN202
            trainable = trainable_placeholders(program)
            nodes = _inner(node, program)
            if any(n.op == "placeholder" and n.name in trainable for n in nodes):
                return []
            return nodes

        config.get_partition = get_partition
    return partitioner


def _max_pool_without_indices(program: torch.export.ExportedProgram) -> None:
    """max_pool2d_with_indices whose indices nobody reads -> max_pool2d, which XNNPACK runs.

    Decomposition turns every max_pool2d into the _with_indices form; the indices are only read
    when a gradient flows back through the pool (never for a frozen backbone's input).
    """
    aten = torch.ops.aten
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.max_pool2d_with_indices.default:
            continue
        users = list(node.users)
        if not all(u.target == operator.getitem and u.args[1] == 0 for u in users):
            continue
        with graph.inserting_before(node):
            pooled = graph.call_function(aten.max_pool2d.default, node.args, node.kwargs)
        pooled.meta = dict(node.meta)
        pooled.meta["val"] = node.meta["val"][0]
        for user in users:
            user.replace_all_uses_with(pooled)
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


# Phi(x) = (x * gelu(x) + TINY / 2) / (x * x + TINY) differs from x * gelu(x) / x^2 = Phi(x) by
# |0.5 - Phi(x)| * TINY / (x^2 + TINY) <= 0.2 * sqrt(TINY) = 2e-16, is 0.5 at x = 0, never divides
# by zero and uses only ops XNNPACK has. Measured against float64 over [-12, 12] and edge values:
# max error 2.7e-7 (fp32 0.5 * (1 + erf(x / sqrt 2)) itself: 6e-8).
_PHI_TINY = 1e-30


def _gelu_backward_without_erf(program: torch.export.ExportedProgram) -> None:
    """Rewrite the decomposed GELU backward's Phi(x) = 0.5 * (1 + erf(x / sqrt 2)) through gelu(x).

    erf has only a portable kernel in ExecuTorch 1.5.1 (and no XNNPACK op): on MiniLM it took 100
    of ~740 ms a step. gelu(x) = x * Phi(x) is computed by the forward already (an XNNPACK op).
    """
    aten = torch.ops.aten
    graph = program.graph_module.graph

    def is_mul_by(node: object, factor: float) -> bool:
        return (isinstance(node, torch.fx.Node) and node.op == "call_function"
                and node.target == aten.mul.Tensor and isinstance(node.args[1], float)
                and math.isclose(node.args[1], factor, rel_tol=1e-12))

    changed = False
    for erf in list(graph.nodes):
        if erf.op != "call_function" or erf.target != aten.erf.default:
            continue
        scaled = erf.args[0]
        if not is_mul_by(scaled, math.sqrt(0.5)) or len(erf.users) != 1:
            continue
        plus_one = next(iter(erf.users))
        if (plus_one.target != aten.add.Tensor or plus_one.args != (erf, 1)
                or len(plus_one.users) != 1):
            continue
        phi = next(iter(plus_one.users))
        if not is_mul_by(phi, 0.5) or phi.args[0] is not plus_one:
            continue
        x = scaled.args[0]
        val = x.meta["val"]
        if val.dtype != torch.float32:
            continue
        gelu = next((u for u in x.users if u.target == aten.gelu.default and len(u.args) == 1
                     and u.kwargs.get("approximate", "none") == "none"), None)

        def op(target, *args):  # noqa: ANN001, ANN202
            new = graph.call_function(target, args)
            new.meta["val"] = val
            return new

        with graph.inserting_before(phi):
            if gelu is None:
                gelu = op(aten.gelu.default, x)
            numerator = op(aten.add.Tensor, op(aten.mul.Tensor, x, gelu), _PHI_TINY / 2)
            denominator = op(aten.add.Tensor, op(aten.mul.Tensor, x, x), _PHI_TINY)
            exact_phi = op(aten.div.Tensor, numerator, denominator)
        phi.replace_all_uses_with(exact_phi)
        for dead in (phi, plus_one, erf, scaled):
            if not dead.users:
                graph.erase_node(dead)
        changed = True
    if changed:
        graph.lint()
        program.graph_module.recompile()
