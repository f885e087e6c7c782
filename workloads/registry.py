"""Look a workload up by name: the one module that imports every workload."""

# Kept apart from workloads.base, which the workloads themselves import: a registry there would
# import them back and close a cycle.

from __future__ import annotations

from workloads import WORKLOAD_NAMES
from workloads.base import Workload, WorkloadData

_FMNIST = ("fmnist-cnn", "fmnist-fedsq", "fmnist-colora")
_FORTUNES = ("minilm-fortunes", "minilm-colora")


def get_workload(name: str) -> Workload:
    """Look a workload up by name."""
    # Imported here so that using one workload never loads the other's heavy dependencies.
    if name == "fmnist-cnn":
        from workloads.cnn import FmnistCnn

        return FmnistCnn()
    if name == "fmnist-fedsq":
        from workloads.fedsq import FmnistFedSq

        return FmnistFedSq()
    if name == "fmnist-colora":
        from workloads.colora import FmnistCoLora

        return FmnistCoLora()
    if name == "minilm-fortunes":
        from workloads.minilm import MiniLmFortunes

        return MiniLmFortunes()
    if name == "minilm-colora":
        from workloads.minilm_colora import MiniLmCoLora

        return MiniLmCoLora()
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOAD_NAMES}")


def get_workload_data(name: str) -> WorkloadData:
    """The data half of a workload (datasets, capabilities) without torch: what a gateway reads."""
    if name in _FMNIST:
        from workloads.fmnist import FashionMnistData

        return FashionMnistData(name)
    if name in _FORTUNES:
        from workloads.fortune_tokens import FortuneTokens

        return FortuneTokens(name)
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOAD_NAMES}")
