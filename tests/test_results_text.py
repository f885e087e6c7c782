"""The text results section: per-run numbers from a federation's result, and the page section
that `python -m experiments.text` writes into RESULTS.md without touching the rest."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.demo import FederationConfig, FederationResult, RoundRow
from edge_client.fleet import FleetConfig
from experiments.report import SECTION_BEGIN, SECTION_END, RunResult, extract_section, with_section
from experiments.text import SETTINGS, _run_result, render


def _result(accuracies: list[float], **fields: object) -> FederationResult:
    result = FederationResult("mosquitto", "debian-fortunes")
    result.rows = [RoundRow(0, 0.25, 1.4, 0, 0, 0, 0.0)] + [
        RoundRow(i + 1, a, 1.0, 4, 1000 + i, 2000, float(i)) for i, a in enumerate(accuracies)]
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def test_run_result_reads_forgetting_and_the_residual_ratio() -> None:
    # Prepare: 2 tasks x 2 rounds; task 1 ends at 0.9 (2 classes) and scores 0.6 at the end
    config = FederationConfig(fleet=FleetConfig(devices=2), rounds=4, workload="minilm-fortunes",
                              strategy="fed-talora", task_schedule=((0, 1), (2, 3)),
                              rounds_per_task=2)
    result = _result([0.8, 0.9, 0.6, 0.7], task_accuracy=[0.6, 0.8],
                     device_accuracy={"a": 0.5, "b": None, "c": 0.7}, residual_ratio=0.25)

    # Execute
    run = _run_result("Fed-TaLoRA", config, result, 3.0, seed=1)

    # Assert: task ends 0.9 and 0.7; forgetting 0.9 - 0.6; unscored devices left out
    assert run.extra["average_incremental"] == pytest.approx(0.8)
    assert run.extra["forgetting"] == pytest.approx(0.3)
    assert run.extra["residual_ratio"] == 0.25
    assert sorted(run.device_accuracy) == [0.5, 0.7] and run.test_accuracy == 0.7


def test_render_has_every_method_and_the_bound_in_a_marked_section() -> None:
    runs = {}
    for name, setting in SETTINGS.items():
        rows = [RunResult(m, [0.5], 0.5, np.array([0.5, 0.4]), 10.0, 20.0,
                          {"seconds": 1.0, "residual_ratio": 0.1, "average_incremental": 0.4,
                           "forgetting": 0.2}, seed) for m, _ in setting.methods for seed in (0, 1)]
        rows += [RunResult("Centralized LoRA (bound)", [0.9], 0.9, np.array([0.9]), 0.0, 0.0,
                           {"seconds": 1.0}, seed) for seed in (0, 1)]
        runs[name] = rows
    page = render(runs, (0, 1), "python -m experiments.text")
    assert page.startswith(SECTION_BEGIN) and page.rstrip().endswith(SECTION_END)
    for setting in SETTINGS.values():
        for method, _ in setting.methods:
            assert page.count(f"| {method} |") == 1
    assert page.count("| Centralized LoRA (bound) |") == 3


def test_a_section_replaces_only_its_own_part_of_the_page() -> None:
    page = f"# Results\n\nsimulator tables\n\n{SECTION_BEGIN}\nold text\n{SECTION_END}\n\nfooter\n"
    new = f"{SECTION_BEGIN}\nnew text\n{SECTION_END}\n"
    assert with_section(page, new) == page.replace("old text", "new text")
    assert extract_section(page) == f"{SECTION_BEGIN}\nold text\n{SECTION_END}"
    # a page without the section gets it appended; an empty section changes nothing
    assert with_section("# Results\n", new) == f"# Results\n\n{new}"
    assert with_section(page, "") == page
