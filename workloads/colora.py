"""CoLoRA device side: LoRA with a personal r×r core, W0x + s·B(S(Ax)), S kept in a local file.

Magakyan, Reisizadeh, Park, Parrilo, Ozdaglar, "Collaborative and Efficient Fine-tuning:
Leveraging Task Similarity", arXiv 2602.07218. A and B are shared by the federation (the server
averages them, aggregator/personal.py); the core S, initialised to the identity so training starts
from plain LoRA, never leaves the device and is persisted per device as a safetensors file. The
W_i = W0 + s·B·S_i·A parametrisation is a reconstruction from the paper's O(d·r + k·r²)
parameter count (ALGORITHMS.md §3, [UNVERIFIED]). Only linear layers are adapted, as in cnn.py;
add_colora puts the layers into any model (minilm_colora.py: MiniLM's attention query/value).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from protocol.tensors import TensorDict, canonical_key
from workloads.cnn import LORA_ALPHA, LORA_RANK, LORA_TARGETS, Cnn, FmnistCnn
from workloads.lora import get_adapter

CORE = "lora_S"  # the module name of a personal core; aggregator.personal treats it as personal
# What a CoLoRA workload adds to its manifest's LoRA summary.
PERSONAL_SUMMARY = {"personal": f"{CORE}: r x r core per layer, on device"}


class DiagonalCore(nn.Module):
    """S = diag(weight): the "per-task scalars" reading of CoLoRA (r numbers per layer)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class CoLoraLinear(nn.Module):
    """A frozen nn.Linear plus s·B·S·A; parameter names mirror peft's (`lora_A.weight`, ...)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, diagonal: bool = False) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # Kaiming-uniform, as peft
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted layer starts equal to W0
        core: nn.Module
        if diagonal:
            core = DiagonalCore(rank)
        else:
            core = nn.Linear(rank, rank, bias=False)
            with torch.no_grad():
                core.weight.copy_(torch.eye(rank))
        self.lora_S = core
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        return self.base_layer(x) + self.scaling * self.lora_B(self.lora_S(self.lora_A(x)))


def build_colora_cnn(
    base_weights: Path, seed: int = 0, rank: int = LORA_RANK, alpha: float = LORA_ALPHA,
    diagonal: bool = False,
) -> Cnn:
    """The pretrained CNN with CoLoRA on fc1/fc2 and a fresh trainable head (as FmnistCnn.build).

    `seed` fixes the head and the A factors, so every device starts from the same shared adapter.
    """
    from safetensors.torch import load_file as load_torch_file

    model = Cnn()
    state = load_torch_file(str(base_weights))
    del state["head.weight"], state["head.bias"]
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.head.reset_parameters()
    model.head.requires_grad_(True)
    return add_colora(model, LORA_TARGETS, rank, alpha, diagonal).eval()


def add_colora(
    model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, diagonal: bool = False,
) -> nn.Module:
    """Swap every nn.Linear whose own name is in `targets` for a CoLoraLinear; returns `model`.

    Targets match the last name segment, as peft's target_modules do ("query" adapts every
    "...attention.self.query"). Layers are wrapped in module order, so a seed set beforehand
    fixes every A factor.

    Raises:
        ValueError: No linear layer matches `targets`.
    """
    # Listed first: swapping while named_modules() walks the model would visit the new layers.
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, CoLoraLinear(linear, rank, alpha, diagonal))
    return model


def is_core(key: str) -> bool:
    """True for a personal core tensor (`fc1.lora_S.weight`)."""
    return CORE in key.split(".")


def shared_adapter(model: nn.Module) -> TensorDict:
    """What the device uploads: every trainable tensor except the personal cores."""
    return {k: v for k, v in get_adapter(model).items() if not is_core(k)}


def personal_cores(model: nn.Module) -> TensorDict:
    """The device's personal cores, canonically keyed."""
    return {k: v for k, v in get_adapter(model).items() if is_core(k)}


def load_tensors(model: nn.Module, tensors: TensorDict, cores: bool) -> None:
    """Overwrite the shared tensors (cores=False) or the cores (cores=True); names must match."""
    params = {k: p for k, p in _trainable(model).items() if is_core(k) == cores}
    if set(params) != set(tensors):
        raise ValueError(f"tensor names differ: {sorted(set(params) ^ set(tensors))}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(tensors[key])).reshape(p.shape))


def save_cores(model: nn.Module, path: Path) -> None:
    """Persist the personal cores (atomic: a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(personal_cores(model), str(tmp))
    tmp.replace(path)


def restore_cores(model: nn.Module, path: Path) -> bool:
    """Load the cores saved by `save_cores`; False (cores left as initialised) if none exist."""
    if not path.exists():
        return False
    load_tensors(model, load_file(str(path)), cores=True)
    return True


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {canonical_key(n): p for n, p in model.named_parameters() if p.requires_grad}


class FmnistCoLora(FmnistCnn):
    """The CNN workload with CoLoRA on fc1/fc2: devices train and keep a personal core each."""

    name = "fmnist-colora"

    def build(self, base_weights: Path, seed: int = 0) -> nn.Module:
        """The CoLoRA model (see build_colora_cnn)."""
        return build_colora_cnn(base_weights, seed)

    def lora_summary(self) -> dict[str, object]:
        """LoRA settings plus the personal cores, for the manifest."""
        return super().lora_summary() | PERSONAL_SUMMARY
