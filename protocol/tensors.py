"""Adapter tensors as name -> array dicts with canonical (peft, adapter-name-stripped) keys."""

from __future__ import annotations

import re

import numpy as np

TensorDict = dict[str, np.ndarray]

# Prefixes that wrappers add in front of the model's own module path: the export wrapper ("m."),
# peft's PeftModel ("base_model.model."). The adapter name segment (".default") is dropped too, as
# peft's get_peft_model_state_dict does, and "modules_to_save" copies take the plain module name.
_WRAPPER_PREFIX = re.compile(r"^(m\.)?(base_model\.model\.)?")
_ADAPTER_SEGMENT = re.compile(r"\.(modules_to_save\.)?default(?=\.)")


def canonical_key(native_name: str) -> str:
    """Map a backend's parameter name to the canonical adapter key.

    >>> canonical_key("m.base_model.model.fc1.lora_A.default.weight")
    'fc1.lora_A.weight'
    >>> canonical_key("base_model.model.head.modules_to_save.default.bias")
    'head.bias'
    """
    return _ADAPTER_SEGMENT.sub("", _WRAPPER_PREFIX.sub("", native_name))


# Tensors with one of these name segments are personal (CoLoRA's r×r cores, `fc1.lora_S.weight`):
# they train on the device and never leave it; globals and updates carry the shared ones only.
PERSONAL_SEGMENTS = ("lora_S",)


def is_personal(name: str) -> bool:
    """Whether a canonical tensor name is device-private."""
    return any(segment in PERSONAL_SEGMENTS for segment in name.split("."))


def shared(tensors: TensorDict) -> TensorDict:
    """The tensors that travel: all but the personal ones."""
    return {k: v for k, v in tensors.items() if not is_personal(k)}


def check_finite(tensors: TensorDict) -> None:
    """Raise ValueError naming the first tensor that holds NaN or Inf."""
    for name, array in tensors.items():
        if not np.isfinite(array).all():  # the method: np.all's Python wrapper costs more
            raise ValueError(f"tensor {name!r} holds NaN or Inf")
