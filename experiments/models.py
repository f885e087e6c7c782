"""Simulated devices' models on trunk features: build, local SGD, evaluation, residual folding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.data import Features
from protocol.tensors import TensorDict
from workloads.cnn import FmnistCnn
from workloads.colora import build_colora_cnn
from workloads.fedsq import build_fedsq

MODEL_KINDS = ("lora", "fedsq", "colora")


def build(kind: str, base_weights: Path, seed: int) -> nn.Module:
    """The device model of one method, from the same pretrained backbone and initial adapter."""
    if kind == "lora":
        return FmnistCnn().build(base_weights, seed)
    if kind == "fedsq":
        return build_fedsq(base_weights, seed)
    if kind == "colora":
        return build_colora_cnn(base_weights, seed)
    raise ValueError(f"unknown model kind {kind!r}; choose from {MODEL_KINDS}")


def _inner(model: nn.Module) -> nn.Module:
    """The Cnn under a peft wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    return base.model if base is not None else model


def logits(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """The model's logits from trunk features: Cnn.forward after its convolutions."""
    inner = _inner(model)
    if hasattr(inner, "forward_features"):  # FedSQ: gated by the structural copy
        return inner.forward_features(feats)
    hidden = inner.relu(inner.fc2(inner.relu(inner.fc1(feats))))
    return inner.head(hidden)


def masked(scores: torch.Tensor, allowed: np.ndarray | None) -> torch.Tensor:
    """Scores with the logits of classes outside `allowed` set to −inf (no gradient to them)."""
    if allowed is None:
        return scores
    keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
    keep[torch.from_numpy(np.asarray(allowed))] = True
    return scores.masked_fill(~keep, float("-inf"))


def sgd_optimiser(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Plain SGD on the trainable tensors, as edge_client/backends/torch_backend.py."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)


def train_steps(
    model: nn.Module, optimiser: torch.optim.Optimizer, data: Features, labels: np.ndarray,
    steps: int, batch: int, rng: np.random.Generator, allowed: np.ndarray | None = None,
) -> float:
    """`steps` SGD steps on batches drawn without replacement, reshuffled per pass.

    The batch schedule is edge_client.trainer.train_local's; `allowed` masks the logits of the
    other classes (class-incremental local training). Returns the mean loss.
    """
    if len(labels) < batch:
        raise ValueError(f"{len(labels)} local examples cannot fill one batch of {batch}")
    order, cursor, losses = rng.permutation(len(labels)), 0, []
    targets = torch.from_numpy(labels)
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(labels)), 0
        idx = torch.from_numpy(order[cursor : cursor + batch])
        cursor += batch
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(masked(logits(model, data.x[idx]), allowed),
                                           targets[idx])
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def predictions(model: nn.Module, data: Features, allowed: np.ndarray | None = None) -> np.ndarray:
    """Predicted class of every example (among `allowed` when given)."""
    with torch.no_grad():
        return masked(logits(model, data.x), allowed).argmax(-1).numpy()


def per_class_accuracy(
    predicted: np.ndarray, targets: np.ndarray, classes: np.ndarray, num_classes: int
) -> np.ndarray:
    """Accuracy on the examples of each Fashion-MNIST class (NaN where a class has none).

    `targets` may be another labelling of the examples (the multi-task group labels); `classes`
    are the original classes, which a device's class shares weight.
    """
    correct = np.bincount(classes, weights=predicted == targets, minlength=num_classes)
    total = np.bincount(classes, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / total


def adapter_nbytes(adapter: TensorDict) -> int:
    """Bytes of the tensors as sent (float32, no codec overhead)."""
    return sum(v.nbytes for v in adapter.values())


def lora_base_layers(model: nn.Module) -> dict[str, tuple[nn.Linear, float]]:
    """Per LoRA layer prefix ("fc1"), its frozen base nn.Linear and LoRA scaling s."""
    inner = _inner(model)
    out = {}
    for name in ("fc1", "fc2"):
        layer = getattr(inner, name)
        out[name] = (layer.base_layer, float(layer.scaling["default"]))
    return out


def set_base_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Overwrite the frozen weights of the LoRA layers (a device's W0 with folded residuals)."""
    layers = lora_base_layers(model)
    with torch.no_grad():
        for name, weight in weights.items():
            layers[name][0].weight.copy_(torch.from_numpy(weight.astype(np.float32)))


def base_weights_of(model: nn.Module) -> dict[str, np.ndarray]:
    """The frozen weights of the LoRA layers, float64 (residuals accumulate without drift)."""
    return {name: layer.weight.detach().numpy().astype(np.float64)
            for name, (layer, _) in lora_base_layers(model).items()}

