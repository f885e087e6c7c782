"""Fashion-MNIST from Debian's dataset-fashion-mnist package, and federated splits of it."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The first PUBLIC_SIZE training images are the "public" slice the backbone is pretrained on
# centrally; devices only ever see the rest, so federated fine-tuning works on unseen data.
PUBLIC_SIZE = 10_000
# A second labelling of the same images, for multi-task federations (FL-TAC): garment group.
# T-shirt, Pullover, Coat, Shirt -> tops; Trouser, Dress -> body; Sandal, Sneaker, Boot -> shoes;
# Bag -> bags. Only T-shirt (0) and Trouser (1) keep their index, so the two tasks conflict.
GROUP_OF_CLASS = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2], dtype=np.int64)
TASK_LABELLINGS = ("type", "group")
# Class-incremental sequence (continual learning, Fed-TaLoRA): 5 tasks of 2 new classes each.
INCREMENTAL_TASKS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def task_labels(task: str, classes: np.ndarray) -> np.ndarray:
    """Labels of a task over Fashion-MNIST classes: the class itself ('type') or its group."""
    if task == "type":
        return np.asarray(classes)
    if task == "group":
        return GROUP_OF_CLASS[classes]
    raise ValueError(f"unknown task {task!r}; choose from {TASK_LABELLINGS}")


_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics, so inputs are roughly N(0, 1)


@dataclass(frozen=True, slots=True)
class Dataset:
    """Images (N, 1, 28, 28) float32 normalised, labels (N,) int64."""

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        """The examples at `index`."""
        return Dataset(self.x[index], self.y[index], self.source)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    # IDX header: 2 zero bytes, dtype code, number of dimensions, then big-endian u32 sizes.
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - _MEAN) / _STD)[:, None, :, :]


def load(split: str) -> Dataset:
    """Load 'train' or 't10k' Fashion-MNIST; fall back to scikit-learn's digits, saying so."""
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    images = FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        return Dataset(_normalise(_read_idx(images)), _read_idx(labels).astype(np.int64),
                       "fashion-mnist")
    logger.warning(
        "Fashion-MNIST not found in %s (apt-get install dataset-fashion-mnist); "
        "falling back to scikit-learn's digits, upscaled to 28x28", FASHION_MNIST_DIR,
    )
    return _digits(split)


def _digits(split: str) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 in [0, 16] -> 24x24 by pixel repetition, padded to 28x28, scaled to [0, 255].
    big = np.kron(digits.images, np.ones((3, 3)))
    padded = np.pad(big, ((0, 0), (2, 2), (2, 2))) * (255.0 / 16.0)
    cut = int(0.8 * len(padded))
    part = slice(0, cut) if split == "train" else slice(cut, None)
    return Dataset(_normalise(padded[part]), digits.target[part].astype(np.int64), "sklearn-digits")


def public_and_private(train: Dataset) -> tuple[Dataset, Dataset]:
    """Split the training set into the public pretraining slice and the devices' private rest."""
    public_size = min(PUBLIC_SIZE, len(train) // 5)
    idx = np.arange(len(train))
    return train.subset(idx[:public_size]), train.subset(idx[public_size:])


def dirichlet_split(
    labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Non-IID label-skew split (Hsu et al. 2019): each class is spread over devices by Dir(alpha).

    Smaller alpha means more skew. Redraws until every device holds at least `min_size` examples.
    """
    if num_devices <= 0 or alpha <= 0:
        raise ValueError("num_devices and alpha must be positive")
    if len(labels) < num_devices * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_devices} devices {min_size} each")
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
    raise RuntimeError(f"no Dirichlet({alpha}) split gave every device {min_size} examples")
