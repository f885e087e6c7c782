"""ONNX Runtime training artifacts: training, eval and optimizer graphs plus a checkpoint."""

from __future__ import annotations

import io
from pathlib import Path

import onnx
import torch
from torch import nn

# ORT 1.19 refuses the IR version (14) that onnx 1.23 writes; 10 is the newest it reads.
ORT_MAX_IR_VERSION = 10
# Opset 17's LayerNormalization has no gradient builder in ORT 1.19's training graph builder.
OPSET = 14
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def export_ort(
    model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], out_dir: Path
) -> None:
    """Write ORT training artifacts (SGD, cross-entropy) that train only the adapter."""
    from onnxruntime.training import artifacts

    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, _ = example
    buffer = io.BytesIO()
    # 1. forward graph, in training mode so parameters stay initializers (not folded constants)
    torch.onnx.export(
        model, (inputs,), buffer, input_names=["inputs"], output_names=["logits"],
        dynamo=False, opset_version=OPSET, training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
    )
    forward = onnx.load_from_string(buffer.getvalue())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    initializers = {i.name for i in forward.graph.initializer}
    missing = set(trainable) - initializers
    if missing:
        raise RuntimeError(f"ONNX export renamed or dropped adapter tensors: {sorted(missing)}")
    # 2. gradient graph, loss and optimizer; logits stay an output so devices can score accuracy
    artifacts.generate_artifacts(
        forward,
        requires_grad=trainable,
        frozen_params=sorted(initializers - set(trainable)),
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=artifacts.OptimType.SGD,
        artifact_directory=str(out_dir),
        additional_output_names=["logits"],
    )
    # 3. make the graphs loadable by ORT 1.19
    for name in ARTIFACT_FILES[:3]:
        path = out_dir / name
        graph = onnx.load(str(path))
        graph.ir_version = min(graph.ir_version, ORT_MAX_IR_VERSION)
        onnx.save(graph, str(path))
