"""Simulation data: frozen-trunk features of Fashion-MNIST, device splits, task definitions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from workloads.base import private_pool
from workloads.cnn import Cnn
from workloads.data import dirichlet_split
from workloads.fmnist import GROUP_OF_CLASS, FashionMnistData  # noqa: F401 (re-exported)

# The simulator runs the CNN workloads' data: frozen-trunk features of Fashion-MNIST.
WORKLOAD = FashionMnistData()
# Class-incremental sequence: 5 tasks of 2 new classes each, in label order.
INCREMENTAL_TASKS = WORKLOAD.incremental_tasks
# The multi-task setting's two labellings of the same images (see workloads.fmnist).
MULTI_TASKS = WORKLOAD.task_labellings
task_labels = WORKLOAD.task_labels
NUM_CLASSES = len(WORKLOAD.labels)  # the head's outputs; the group task uses the first 4


@dataclass(frozen=True, slots=True)
class Features:
    """Trunk features (N, 1568) of images, with their Fashion-MNIST class labels (N,)."""

    x: torch.Tensor
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Features:
        """The examples at `index`."""
        return Features(self.x[torch.from_numpy(np.asarray(index))], self.y[index])


def trunk_features(base_weights: Path, images: np.ndarray, batch: int = 2000) -> torch.Tensor:
    """The frozen convolutions of the pretrained CNN applied to `images` (N, 1, 28, 28).

    Every method adapts only fc1/fc2 and the head, and the convolutions have no dropout or
    batch statistics, so computing them once is the same function as running the whole model.
    """
    cnn = Cnn()
    cnn.load_state_dict(load_file(str(base_weights)))
    cnn.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch])
            x = cnn.pool(cnn.relu(cnn.conv1(x)))
            out.append(cnn.pool(cnn.relu(cnn.conv2(x))).flatten(1))
    return torch.cat(out)


def load_features(
    base_weights: Path, train_examples: int, test_examples: int, seed: int
) -> tuple[Features, Features]:
    """Random slices of the private training part and of the test set, as trunk features."""
    rng = np.random.default_rng(seed)
    private, test = private_pool(WORKLOAD), WORKLOAD.test_data()
    train_idx = np.sort(rng.choice(len(private), min(train_examples, len(private)), replace=False))
    test_idx = np.sort(rng.choice(len(test), min(test_examples, len(test)), replace=False))
    return (Features(trunk_features(base_weights, private.x[train_idx]), private.y[train_idx]),
            Features(trunk_features(base_weights, test.x[test_idx]), test.y[test_idx]))


def split(
    labels: np.ndarray, devices: int, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Dirichlet(alpha) label-skew indices per device (workloads.data.dirichlet_split, seeded)."""
    return dirichlet_split(labels, devices, alpha, np.random.default_rng(seed), min_size=min_size)


def class_shares(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Fraction of `labels` in each class: the weights of a device's test accuracy."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / counts.sum()
