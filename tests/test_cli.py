"""The command line: argument wiring that has no other test."""

from __future__ import annotations

import math

import pytest

from edgefl.cli import _federation_config, build_parser, dp_report, task_schedule
from aggregator.accounting import epsilon


def _aggregator_args(*extra: str):  # noqa: ANN202
    return build_parser().parse_args(["aggregator", "--rounds", "20", "--clients-per-round", "10",
                                      "--min-clients", "5", *extra])


def test_dp_federation_reports_epsilon_of_its_whole_run() -> None:
    args = _aggregator_args("--strategy", "dp-fedavg", "--clip-norm", "1.0", "--dp-noise", "1.1")
    line = dp_report(args)
    assert line is not None
    expected = epsilon(1.1, 20, 1e-5)
    assert f"ε = {expected:.2f}" in line and "δ = 1e-05" in line
    assert 0 < expected < math.inf


def test_more_noise_reports_a_smaller_epsilon() -> None:
    def eps(noise: str) -> float:
        line = dp_report(_aggregator_args("--strategy", "dp-fedavg", "--clip-norm", "1",
                                          "--dp-noise", noise))
        assert line is not None
        return float(line.split("ε = ")[1].split()[0])

    assert eps("2.0") < eps("0.8")


def test_other_strategies_report_no_privacy() -> None:
    assert dp_report(_aggregator_args("--strategy", "fedavg")) is None


def test_unknown_strategy_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        _aggregator_args("--strategy", "nonsense")


def test_task_schedule_parses_and_fed_talora_defaults_to_five_by_two() -> None:
    parser = build_parser()
    args = parser.parse_args(["aggregator", "--strategy", "fedavg", "--task-schedule", "0,1;2"])
    assert task_schedule(args) == ((0, 1), (2,))
    args = parser.parse_args(["aggregator", "--strategy", "fed-talora"])
    assert task_schedule(args) == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert task_schedule(parser.parse_args(["aggregator"])) == ()
    with pytest.raises(SystemExit, match="--task-schedule"):
        task_schedule(parser.parse_args(["aggregator", "--task-schedule", "0,one"]))


def test_bad_method_settings_end_with_a_message_not_a_traceback() -> None:
    args = build_parser().parse_args(["demo", "--strategy", "fltac", "--clusters", "0"])
    with pytest.raises(SystemExit, match="edgefl: num_clusters must be at least 1"):
        _federation_config(args, "runs/demo")
    args = build_parser().parse_args(["demo", "--task-schedule", "0,1;-1"])
    with pytest.raises(SystemExit, match="class ids"):
        _federation_config(args, "runs/demo")
