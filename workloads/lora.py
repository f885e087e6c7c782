"""Read and write a torch model's trainable adapter as a canonical TensorDict."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from protocol.tensors import TensorDict, canonical_key, is_personal


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
    """Overwrite the trainable tensors from a canonical TensorDict.

    Every name must match, except that personal tensors may be left out (they keep their values).
    """
    params = {canonical_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing = {k for k in set(params) - set(adapter) if not is_personal(k)}
    unexpected = set(adapter) - set(params)
    if missing or unexpected:
        raise ValueError(
            f"adapter names differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        for key, array in adapter.items():
            p = params[key]
            p.copy_(torch.from_numpy(array).to(p.dtype).reshape(p.shape))


def with_lora_and_new_head(model: nn.Module, rank: int, alpha: int,
                           targets: str | tuple[str, ...], seed: int) -> nn.Module:
    """Reset `model.head` from `seed`, add LoRA on `targets`; only LoRA and the head train.

    `targets` is a tuple of module names or one regular expression (peft accepts both).

    Dropout stays 0 and the model is returned in eval mode, so every backend computes the
    same function as the exported programs.
    """
    torch.manual_seed(seed)
    model.head.reset_parameters()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        modules_to_save=["head"])
    return get_peft_model(model, config).eval()
