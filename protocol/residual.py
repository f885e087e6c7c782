"""Residual tensors on the wire: per LoRA layer, factors `<layer>.U`/`<layer>.V` or `<layer>.dense`.

Both sides use these: devices to turn what they receive into the frozen-weight change they add,
the gateway and tests to read a residual back.
"""

from __future__ import annotations

import numpy as np

from protocol.tensors import TensorDict

U, V, DENSE = ".U", ".V", ".dense"


def residual_layers(tensors: TensorDict) -> list[str]:
    """The LoRA layers a residual names, sorted.

    Raises:
        ValueError: a name without a known suffix, a U without its V (or the reverse), or a
            layer given both as factors and dense.
    """
    layers: dict[str, set[str]] = {}
    for name in tensors:
        suffix = next((s for s in (U, V, DENSE) if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"residual tensor {name!r} ends in none of {U}, {V}, {DENSE}")
        layers.setdefault(name[: -len(suffix)], set()).add(suffix)
    for layer, parts in layers.items():
        if parts not in ({U, V}, {DENSE}):
            raise ValueError(f"residual layer {layer!r} has {sorted(parts)}: need U and V, or dense")
    return sorted(layers)


def dense_residual(tensors: TensorDict) -> dict[str, np.ndarray]:
    """Per layer, the residual as one float32 matrix (U @ V, or the dense one as sent).

    Raises:
        ValueError: as residual_layers, or factors whose shapes do not multiply.
    """
    out: dict[str, np.ndarray] = {}
    for layer in residual_layers(tensors):
        if layer + DENSE in tensors:
            out[layer] = np.asarray(tensors[layer + DENSE], np.float32)
            continue
        u, v = tensors[layer + U], tensors[layer + V]
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"residual factors of {layer!r} have shapes {u.shape} and {v.shape}")
        out[layer] = (np.asarray(u, np.float64) @ np.asarray(v, np.float64)).astype(np.float32)
    return out
