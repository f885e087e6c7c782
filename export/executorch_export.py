"""ExecuTorch training program: a joint forward/backward graph lowered to a .pte file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TrainStep(nn.Module):
    """Model + cross-entropy. The first output must be the loss for the joint-graph export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model  # short prefix: ExecuTorch names parameters "m.<peft name>"

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.m(inputs)
        # logits come out detached so devices can measure accuracy from the same call.
        return nn.functional.cross_entropy(logits, labels), logits.detach()


def export_pte(model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], out: Path) -> None:
    """Write a .pte whose "forward" method returns (loss, logits) and the adapter gradients."""
    from executorch.exir import to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    # 1. capture the training step; strict=False because HF models do not trace strictly
    program = export(TrainStep(model), example, strict=False)
    # 2. add the backward pass: gradients for parameters with requires_grad (the adapter only)
    program = _export_forward_backward(program)
    # 3-4. lower to the edge dialect and to an ExecuTorch program (portable kernels)
    executorch_program = to_edge(program).to_executorch()
    out.write_bytes(executorch_program.buffer)
