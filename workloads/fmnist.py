"""Fashion-MNIST from Debian's dataset-fashion-mnist package, and federated splits of it."""

# numpy only (no torch): FashionMnistData is what the gateway asks about the CNN workloads.

from __future__ import annotations

import gzip
import logging
from functools import cache
from pathlib import Path

import numpy as np

from workloads.base import RunSize
from workloads.data import Dataset, dirichlet_share

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


@cache
def _private_part() -> Dataset:
    # Loaded once per process: a fleet asks for hundreds of shares of it.
    return public_and_private(load("train"))[1]


@cache
def _test_set() -> Dataset:
    return load("t10k")


class FashionMnistData:
    """The data half of every Fashion-MNIST workload: shares of the private part, t10k to test.

    Capabilities: a second labelling of the same images (garment group, FL-TAC's multi-task
    devices) and a class-incremental schedule of 5 tasks x 2 classes (Fed-TaLoRA).
    """

    name = "fmnist-cnn"
    labels = LABELS
    batch_size = 32
    demo = RunSize(devices=6, rounds=6, local_steps=20)
    emulate = RunSize(devices=1000, rounds=3, local_steps=2)
    eval_size = 2000
    task_labellings = TASK_LABELLINGS
    incremental_tasks = INCREMENTAL_TASKS

    def __init__(self, name: str | None = None) -> None:
        if name is not None:  # the gateway's data-only view of fmnist-fedsq, fmnist-colora
            self.name = name

    def device_data(self, index: int, num_devices: int, alpha: float, seed: int) -> Dataset:
        """Device `index`'s Dirichlet share of the private part (never the public slice)."""
        return dirichlet_share(_private_part(), index, num_devices, alpha, seed, self.batch_size)

    def test_data(self, size: int | None = None) -> Dataset:
        """The first `size` images of t10k (shuffled by class already)."""
        return _test_set().head(size)

    def task_labels(self, task: str, labels: np.ndarray) -> np.ndarray:
        """Labels under one of TASK_LABELLINGS (see task_labels)."""
        return task_labels(task, labels)

    def local_tasks(self, index: int, num_devices: int, alpha: float, seed: int
                    ) -> dict[str, Dataset]:
        """A multi-task device's data: its share cut in disjoint parts, one per labelling."""
        share = self.device_data(index, num_devices, alpha, seed)
        # Seeded by (seed, index): every process cuts a device's share the same way.
        parts = np.array_split(np.random.default_rng((seed, index)).permutation(len(share)),
                               len(TASK_LABELLINGS))
        return {task: Dataset(share.x[np.sort(part)], task_labels(task, share.y[np.sort(part)]),
                              share.source)
                for task, part in zip(TASK_LABELLINGS, parts, strict=True)}

    def task_test_data(self, task: str, size: int | None = None) -> Dataset:
        """The first `size` test images, labelled by one of TASK_LABELLINGS."""
        test = self.test_data(size)
        return Dataset(test.x, task_labels(task, test.y), test.source)
