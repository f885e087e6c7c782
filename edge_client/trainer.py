"""Pick a Trainer backend by name, and the local training/evaluation loops over any backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.trainer_base import (  # noqa: F401  (re-exported: callers import them from here)
    MASK_LOGIT,
    StepResult,
    Trainer,
    base_weight_name,
    class_mask_bias,
    correct_count,
    find_logit_bias,
    logit_bias_name,
)
from protocol.manifest import load_manifest

BACKENDS = ("executorch", "onnxruntime", "torch")
DEFAULT_LEARNING_RATE = 0.05


@dataclass(frozen=True, slots=True)
class TrainResult:
    """Summary of a device's local training in one round."""

    steps: int
    samples: int  # the device's local dataset size n_k: its FedAvg weight
    mean_loss: float
    accuracy: float  # on the training batches, before each step


def make_trainer(
    backend: str, artifact_dir: Path, learning_rate: float = DEFAULT_LEARNING_RATE
) -> Trainer:
    """Open the artifacts in `artifact_dir` with the named backend."""
    manifest = load_manifest(artifact_dir)
    if backend == "executorch":
        from edge_client.backends.executorch_backend import ExecuTorchTrainer

        return ExecuTorchTrainer(artifact_dir, manifest, learning_rate)
    if backend == "onnxruntime":
        from edge_client.backends.ort_backend import OrtTrainer

        return OrtTrainer(artifact_dir, manifest, learning_rate)
    if backend == "torch":
        from edge_client.backends.torch_backend import TorchTrainer

        return TorchTrainer(manifest, learning_rate)
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def train_local(
    trainer: Trainer, inputs: np.ndarray, labels: np.ndarray, steps: int, rng: np.random.Generator
) -> TrainResult:
    """Run `steps` SGD steps on batches drawn without replacement (reshuffled per pass)."""
    batch = trainer.manifest.batch_size
    local_size = len(labels)
    if local_size == 0:
        raise ValueError("a device with no local examples cannot train")
    if len(labels) < batch:
        # Programs have a static batch size; a device holding fewer examples fills each batch
        # by sampling its data with replacement (a tiny phone dataset is normal in a fleet).
        order = rng.choice(len(labels), size=batch, replace=True)
        inputs, labels = inputs[order], labels[order]
    order = rng.permutation(len(labels))
    cursor, losses, correct = 0, [], 0
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(labels)), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        result = trainer.train_step(inputs[idx], labels[idx])
        losses.append(result.loss)
        correct += result.correct
    return TrainResult(steps, local_size, float(np.mean(losses)), correct / (steps * batch))


def dataset_logits(trainer: Trainer, inputs: np.ndarray) -> np.ndarray:
    """Logits (N, classes) float64 of a whole dataset, batch by batch."""
    batch = trainer.manifest.batch_size
    logits = []
    for start in range(0, len(inputs), batch):
        x = inputs[start : start + batch]
        real = len(x)
        if real < batch:  # programs have a static batch size: pad, then drop the padded rows
            x = np.concatenate([x, np.zeros((batch - real, *x.shape[1:]), dtype=x.dtype)])
        logits.append(trainer.logits(x)[:real])
    return np.concatenate(logits).astype(np.float64)


def evaluate_dataset(trainer: Trainer, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole dataset."""
    all_logits = dataset_logits(trainer, inputs)
    # log-softmax, stabilised by subtracting the row maximum
    shifted = all_logits - all_logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return loss, correct_count(all_logits, labels) / len(labels)
