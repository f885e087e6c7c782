"""Read and write a torch model's trainable adapter as a canonical TensorDict."""

from __future__ import annotations

import torch
from torch import nn

from protocol.tensors import TensorDict, canonical_key


def trainable_names(model: nn.Module) -> list[str]:
    """Native names of the parameters that train (LoRA factors and trainable heads)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_adapter(model: nn.Module) -> TensorDict:
    """Copy the trainable tensors out, keyed canonically, as float32 numpy arrays."""
    return {
        canonical_key(name): p.detach().to(torch.float32).cpu().numpy().copy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def set_adapter(model: nn.Module, adapter: TensorDict) -> None:
    """Overwrite the trainable tensors from a canonical TensorDict (all names must match)."""
    params = {canonical_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(adapter):
        raise ValueError(
            f"adapter names differ: missing {sorted(set(params) - set(adapter))}, "
            f"unexpected {sorted(set(adapter) - set(params))}"
        )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(torch.from_numpy(adapter[key]).to(p.dtype).reshape(p.shape))
