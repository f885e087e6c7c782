"""Local data of emulated devices: a device's Dirichlet share of Fashion-MNIST's private part."""

from __future__ import annotations

import numpy as np

from workloads import fmnist

MIN_EXAMPLES = 64  # every device must fill a couple of 32-example batches


def device_partitions(
    num_devices: int, alpha: float, seed: int
) -> tuple[fmnist.Dataset, list[np.ndarray]]:
    """The private training data and each device's indices into it (non-IID, Dirichlet)."""
    _, private = fmnist.public_and_private(fmnist.load("train"))
    parts = fmnist.dirichlet_split(
        private.y, num_devices, alpha, np.random.default_rng(seed), min_size=MIN_EXAMPLES
    )
    return private, parts


def device_data(index: int, num_devices: int, alpha: float, seed: int) -> fmnist.Dataset:
    """Data of device `index` of `num_devices` (the same split on every process for one seed)."""
    if not 0 <= index < num_devices:
        raise ValueError(f"device index {index} outside 0..{num_devices - 1}")
    private, parts = device_partitions(num_devices, alpha, seed)
    return private.subset(parts[index])
