"""Per-device accuracy: per-class test accuracy weighted by a device's own label mix."""

from __future__ import annotations

import math

import numpy as np

from edgefl.device_scores import class_accuracy, mix_accuracy


def test_class_accuracy_counts_hits_per_true_class() -> None:
    # Prepare: class 0 right 1 of 2, class 1 right 2 of 2, class 2 absent, class 3 wrong once
    logits = np.array([[5, 0, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0]],
                      dtype=np.float64)
    labels = np.array([0, 0, 1, 1, 3])

    # Execute
    per_class = class_accuracy(logits, labels, 4)

    # Assert
    assert per_class[0] == 0.5 and per_class[1] == 1.0 and per_class[3] == 0.0
    assert math.isnan(per_class[2])


def test_mix_accuracy_weights_classes_by_the_devices_own_labels() -> None:
    per_class = np.array([0.5, 1.0, np.nan, 0.0])
    # 3 examples of class 0 and 1 of class 1: (3 * 0.5 + 1 * 1.0) / 4
    assert mix_accuracy(per_class, np.array([0, 0, 0, 1])) == 0.625
    # class 2 is not in the test set: left out, the rest renormalised: (1 * 1.0 + 1 * 0.0) / 2
    assert mix_accuracy(per_class, np.array([1, 2, 2, 3])) == 0.5
    # nothing of the device's classes scored
    assert mix_accuracy(per_class, np.array([2, 2])) is None
