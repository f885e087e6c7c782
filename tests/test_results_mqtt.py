"""The MQTT results page: per-run numbers from a federation's rows, and the rendered tables."""

from __future__ import annotations

import pytest

from edgefl.demo import FederationResult, RoundRow
from experiments.mqtt import SETTINGS, _run_result, render


def _result(accuracies: list[float], slots: dict[str, float] | None = None) -> FederationResult:
    result = FederationResult("mosquitto", "fashion-mnist")
    result.rows = [RoundRow(0, 0.1, 2.3, 0, 0, 0, 0.0)] + [
        RoundRow(i + 1, a, 1.0, 4, 1000 + i, 2000, float(i)) for i, a in enumerate(accuracies)]
    result.slot_accuracy = slots or {}
    return result


def test_run_result_reads_slots_bytes_and_task_ends() -> None:
    run = _run_result("FL-TAC", "multitask", _result([0.5, 0.7, 0.6], {"a/t0": 0.9, "b": 0.3}),
                      12.0, seed=1, rounds_per_task=1)
    assert run.history == [0.5, 0.7, 0.6] and run.test_accuracy == 0.6
    assert sorted(run.device_accuracy) == [0.3, 0.9] and run.rounds_to_best == 2
    assert run.bytes_up == pytest.approx(1001.0) and run.bytes_down == 2000.0
    # continual: the accuracy at the end of each task (every 2nd round here) is averaged
    run = _run_result("Fed-TaLoRA", "incremental", _result([0.9, 0.8, 0.6, 0.5]), 3.0, 0, 2)
    assert run.extra["average_incremental"] == pytest.approx((0.8 + 0.5) / 2)


def test_render_has_one_row_per_method_of_each_setting() -> None:
    runs = {name: [_run_result(method, name, _result([0.4, 0.6], {"s": 0.6}), 1.0, 0, 1)
                   for method, _ in SETTINGS[name][2]] for name in SETTINGS}
    page = render(runs, (0,), "python -m experiments.mqtt")
    for name in SETTINGS:
        for method, _ in SETTINGS[name][2]:
            assert page.count(f"| {method} |") == 1
