"""CoLoRA server side: average only the shared LoRA factors; personal r×r cores stay on devices.

Magakyan, Reisizadeh, Park, Parrilo, Ozdaglar, "Collaborative and Efficient Fine-tuning:
Leveraging Task Similarity", arXiv 2602.07218 (ALGORITHMS.md §3). The O(d·r + k·r²) parameter
count is read as W_i = W0 + s·B·S_i·A with A, B shared and an r×r core S_i per user; that reading,
and averaging A and B by FedAvg, are reconstructions ([UNVERIFIED] in the notes). A core is named
`<layer>.lora_S.weight`; `shared_part` is the filter a device applies before uploading, and the
aggregate never holds a personal key even if a device forgot to filter.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.strategies import WeightedAdapter, fedavg
from protocol import tensors as protocol_tensors
from protocol.tensors import TensorDict

# Module-path segments that mark a tensor as personal. The head is not personal by default: the
# paper shares everything but the cores; a per-device head is an opt-in deviation.
PERSONAL_SEGMENTS = protocol_tensors.PERSONAL_SEGMENTS


def is_personal(key: str, personal: Sequence[str] = PERSONAL_SEGMENTS) -> bool:
    """True when a segment of the dotted `key` is one of `personal` (e.g. `fc1.lora_S.weight`)."""
    return any(segment in personal for segment in key.split("."))


def shared_part(adapter: TensorDict, personal: Sequence[str] = PERSONAL_SEGMENTS) -> TensorDict:
    """The tensors a device may upload: `adapter` without its personal keys (not copied)."""
    return {k: v for k, v in adapter.items() if not is_personal(k, personal)}


def colora(
    updates: Sequence[WeightedAdapter], personal: Sequence[str] = PERSONAL_SEGMENTS
) -> TensorDict:
    """CoLoRA aggregation: sample-weighted FedAvg of the shared tensors only.

    Note: like FLORA it averages A and B separately; with personal cores between them the
    product B·S_i·A is trilinear, so no shared residual could make this exact.

    Raises:
        ValueError: as fedavg, or when nothing shared is left after filtering.
    """
    shared = [(shared_part(adapter, personal), weight) for adapter, weight in updates]
    if updates and not any(a for a, _ in shared):
        raise ValueError("every tensor is personal: nothing to aggregate")
    return fedavg(shared)
