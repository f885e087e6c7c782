"""Per-device accuracy at the end of a run: each device's own model, on its own label mix."""

# A device's model is what it would use after the run: the global adapter (with the residual
# folded in, for exact aggregation), its FL-TAC cluster's adapter, plus its personal tensors
# (CoLoRA cores) read back from the device's state folder. Its accuracy is the model's per-class
# test accuracy weighted by the device's own training labels: a device that only sees two
# classes cares about those two.

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from edge_client.agent import personal_file
from edge_client.fleet import FleetConfig, device_tasks, fleet_device_id
from edge_client.trainer import Trainer, dataset_logits
from protocol.messages import slot_key, slot_start_adapter
from protocol.residual import dense_residual
from protocol.tensors import TensorDict
from workloads.base import WorkloadData
from workloads.data import Dataset

# Devices with personal tensors need one scoring pass each; beyond this many task slots the
# rest are reported as null (not scored) rather than making a 1,000-device run wait minutes.
MAX_PERSONAL_SLOTS = 64


def class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy per true class (NaN for a class absent from `labels`)."""
    hits = np.bincount(labels, weights=logits.argmax(-1) == labels, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def mix_accuracy(per_class: np.ndarray, train_labels: np.ndarray) -> float | None:
    """Per-class accuracy weighted by how often each class occurs in `train_labels`.

    Classes the test set lacks (NaN) are left out; None if no class of the device is scored.
    """
    counts = np.bincount(train_labels, minlength=len(per_class)).astype(np.float64)
    scored = ~np.isnan(per_class) & (counts > 0)
    if not scored.any():
        return None
    return float((counts[scored] * per_class[scored]).sum() / counts[scored].sum())


def device_accuracy(
    evaluator: Trainer, data: WorkloadData, fleet: FleetConfig,
    adapter: TensorDict, clusters: tuple[TensorDict, ...], assignment: dict[str, int],
    residual: dict[str, np.ndarray], state_dir: Path, test: Dataset,
    classes: list[int] | None = None,
) -> dict[str, float | None]:
    """Device id -> its model's accuracy on its label mix (mean over its task slots).

    Args:
        evaluator: A trainer of the run's artifacts, used for scoring only.
        data, fleet: Where the devices' shares come from.
        adapter, clusters, assignment, residual: The final global state.
        state_dir: The devices' state folder (personal tensors are read from there).
        test: The held-out test set (multi-task fleets use each task's own).
        classes: Classes scored (a class-incremental run's seen classes); None for all.
    """
    num_classes = len(data.labels)
    # Only what the run used is set: programs without a residual input or a logit bias refuse
    # these calls.
    if residual:
        evaluator.set_base_delta(dense_residual(residual))
    if classes is not None:
        evaluator.set_class_mask(classes)
    slots = _device_slots(data, fleet)
    cache: dict[tuple[object, str], np.ndarray] = {}
    personal_scored = 0
    scores: dict[str, float | None] = {}
    try:
        for device, tasks in slots.items():
            values: list[float | None] = []
            for slot, task, train_labels in tasks:
                path = personal_file(state_dir, device, slot)
                start = slot_start_adapter(adapter, clusters, assignment, slot_key(device, slot))
                key: object = assignment.get(slot_key(device, slot), -1)
                personal: TensorDict = {}
                if path.exists():
                    if personal_scored >= MAX_PERSONAL_SLOTS:
                        values.append(None)
                        continue
                    personal, key = load_file(str(path)), (device, slot)
                    personal_scored += 1
                task_test = test if not task else data.task_test_data(  # type: ignore[attr-defined]
                    task, len(test))
                if classes is not None:
                    task_test = task_test.subset(np.flatnonzero(np.isin(task_test.y, classes)))
                if (key, task) not in cache:
                    evaluator.set_adapter(start | personal)
                    logits = dataset_logits(evaluator, task_test.x)
                    cache[key, task] = class_accuracy(logits, task_test.y, num_classes)
                values.append(mix_accuracy(cache[key, task], train_labels))
            scored = [v for v in values if v is not None]
            scores[device] = float(np.mean(scored)) if scored else None
    finally:  # (each scoring sets the residual it needs itself)
        if classes is not None:
            evaluator.set_class_mask(None)
    return scores


def _device_slots(data: WorkloadData, fleet: FleetConfig
                  ) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """Device id -> its (slot name, task, training labels); task "" for a one-task device."""
    out = {}
    for i in range(fleet.devices):
        if fleet.multitask:
            out[fleet_device_id(i)] = [(t.name, kind, t.labels)
                                       for kind, t in device_tasks(fleet, data, i).items()]
        else:
            share = data.device_data(i, fleet.devices, fleet.alpha, fleet.seed)
            out[fleet_device_id(i)] = [("", "", share.y)]
    return out
