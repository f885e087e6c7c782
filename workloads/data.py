"""Datasets in a model's own input format, and the Dirichlet split that gives devices shares."""

# numpy only: the gateway may ask a workload's data half about its capabilities without torch.

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True, slots=True)
class Dataset:
    """Inputs (N, ...) in the model's input format, labels (N,) int64, and where they came from.

    Fashion-MNIST: normalised float32 images (N, 1, 28, 28); MiniLM: int64 token ids (N, seq_len).
    """

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        """The examples at `index`."""
        return Dataset(self.x[index], self.y[index], self.source)

    def head(self, size: int | None) -> Dataset:
        """The first `size` examples (all of them for None)."""
        return self if size is None or size >= len(self) else self.subset(np.arange(size))


def dirichlet_split(
    labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Non-IID label-skew split (Hsu et al. 2019): each class is spread over devices by Dir(alpha).

    Smaller alpha means more skew. Redraws until every device holds at least `min_size` examples;
    a fleet so large that no draw does (10,000 devices on a few examples each) gets the last
    draw with examples moved from the largest shares to the ones below `min_size`.
    """
    if num_devices <= 0 or alpha <= 0:
        raise ValueError("num_devices and alpha must be positive")
    if len(labels) < num_devices * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_devices} devices "
                         f"{min_size} each")
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    return [np.sort(np.array(p, dtype=np.int64)) for p in _top_up(parts, min_size)]


def _top_up(parts: list[list[int]], min_size: int) -> list[list[int]]:
    """Move examples from the largest parts to those below `min_size` (enough exist: checked)."""
    by_size = sorted(range(len(parts)), key=lambda d: len(parts[d]), reverse=True)
    donor = 0
    for device in range(len(parts)):
        while len(parts[device]) < min_size:
            while len(parts[by_size[donor]]) <= min_size:
                donor += 1
            parts[device].append(parts[by_size[donor]].pop())
    return parts


def min_share(pool_size: int, num_devices: int, batch_size: int) -> int:
    """Fewest examples a device may get: two batches, unless the fleet is too large for that.

    A thousand devices cannot each hold two batches of a 50k pool (Dirichlet shares vary a lot),
    so large fleets settle for an eighth of the even share; training fills a short device's
    batches by sampling with replacement (edge_client.trainer.train_local).
    """
    return max(1, min(2 * batch_size, pool_size // (8 * num_devices)))


def dirichlet_share(pool: Dataset, index: int, num_devices: int, alpha: float, seed: int,
                    batch_size: int) -> Dataset:
    """Device `index`'s Dirichlet(alpha) share of `pool`: the same on every process for a seed."""
    if not 0 <= index < num_devices:
        raise ValueError(f"device index {index} outside 0..{num_devices - 1}")
    labels = np.ascontiguousarray(pool.y, dtype=np.int64)
    parts = _parts(labels.tobytes(), num_devices, alpha, seed,
                   min_share(len(labels), num_devices, batch_size))
    return pool.subset(parts[index])


@lru_cache(maxsize=8)
def _parts(labels: bytes, num_devices: int, alpha: float, seed: int,
           min_size: int) -> tuple[np.ndarray, ...]:
    # Cached: a fleet asks for each of its (up to thousands of) devices' shares in turn, and
    # drawing the split is far slower than hashing the labels to find it again.
    rng = np.random.default_rng(seed)
    return tuple(dirichlet_split(np.frombuffer(labels, dtype=np.int64), num_devices, alpha, rng,
                                 min_size))
