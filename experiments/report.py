"""Results of simulated runs, aggregated over seeds, as Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class RunResult:
    """One method in one setting with one seed."""

    method: str
    history: list[float]  # per round (or per task): the accuracy that picks "rounds to best"
    test_accuracy: float  # final, on the test set
    device_accuracy: np.ndarray  # final, per device, weighted by the device's class shares
    bytes_up: float  # per round, all devices together, float32 tensors without codec overhead
    bytes_down: float
    extra: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    @property
    def rounds_to_best(self) -> int:
        """First round (1-based) at which `history` reaches its maximum."""
        return int(np.argmax(self.history)) + 1


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: header and how to read one run's value (None: not applicable)."""

    header: str
    value: str  # attribute of RunResult or key of RunResult.extra
    kind: str = "acc"  # acc (mean ± std over seeds), int, bytes, delta (paired vs first row)


STANDARD_COLUMNS = (
    Column("test acc", "test_accuracy"),
    Column("mean device acc", "mean_device"),
    Column("worst device acc", "worst_device"),
    Column("rounds to best", "rounds_to_best", "int"),
    Column("bytes up / round", "bytes_up", "bytes"),
    Column("bytes down / round", "bytes_down", "bytes"),
)


def _value(run: RunResult, name: str) -> float | None:
    if name == "mean_device":
        return float(np.mean(run.device_accuracy))
    if name == "worst_device":
        return float(np.min(run.device_accuracy))
    if name == "best":
        return float(np.max(run.history))
    if name in run.extra:
        return run.extra[name]
    value = getattr(run, name, None)
    return None if value is None else float(value)


def _cell(values: list[float | None], kind: str) -> str:
    if any(v is None for v in values):
        return "—"
    if kind == "delta":
        array = np.array(values, dtype=np.float64)
        spread = f" ± {array.std(ddof=1):.3f}" if len(array) > 1 else ""
        return f"{array.mean():+.3f}{spread}"
    array = np.array(values, dtype=np.float64)
    if kind == "bytes":
        return "0" if array.mean() == 0 else f"{array.mean():,.0f}"
    if kind == "int":
        return f"{array.mean():.1f}" if len(array) > 1 else f"{int(array[0])}"
    if len(array) == 1:
        return f"{array[0]:.3f}"
    return f"{array.mean():.3f} ± {array.std(ddof=1):.3f}"


def table(runs: Sequence[RunResult], columns: Sequence[Column] = STANDARD_COLUMNS) -> str:
    """A Markdown table with one row per method (in first-seen order), seeds pooled."""
    methods = list(dict.fromkeys(r.method for r in runs))
    lines = ["| method | " + " | ".join(c.header for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in methods:
        mine = [r for r in runs if r.method == method]
        cells = [_cell(paired_delta(runs, method, methods[0], c.value) if c.kind == "delta"
                       else [_value(r, c.value) for r in mine], c.kind) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_delta(runs: Sequence[RunResult], method: str, baseline: str, name: str
                 ) -> list[float | None]:
    """Per seed, `method`'s value of `name` minus `baseline`'s (same split, init and batches)."""
    base = {r.seed: _value(r, name) for r in runs if r.method == baseline}
    out: list[float | None] = []
    for run in (r for r in runs if r.method == method):
        value, reference = _value(run, name), base.get(run.seed)
        out.append(None if value is None or reference is None else value - reference)
    return out


def summary(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """method -> mean over seeds of the headline numbers (for tests and the JSON dump)."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        out[method] = {
            "test_accuracy": float(np.mean([r.test_accuracy for r in mine])),
            "mean_device": float(np.mean([np.mean(r.device_accuracy) for r in mine])),
            "worst_device": float(np.mean([np.min(r.device_accuracy) for r in mine])),
            "rounds_to_best": float(np.mean([r.rounds_to_best for r in mine])),
            "bytes_up": float(np.mean([r.bytes_up for r in mine])),
            "bytes_down": float(np.mean([r.bytes_down for r in mine])),
        } | {k: float(np.mean([r.extra[k] for r in mine])) for k in mine[0].extra}
    return out


# docs/RESULTS.md holds the simulator's page and, between these markers, the text federations'
# section (experiments.text): each command rewrites its own part and keeps the other's.
SECTION_BEGIN, SECTION_END = "<!-- text-results:begin -->", "<!-- text-results:end -->"


def extract_section(text: str) -> str:
    """The marked section of a page, markers included ("" if it has none)."""
    if SECTION_BEGIN not in text or SECTION_END not in text:
        return ""
    return SECTION_BEGIN + text.split(SECTION_BEGIN, 1)[1].split(SECTION_END, 1)[0] + SECTION_END


def with_section(text: str, section: str) -> str:
    """`text` with its marked section replaced by `section` (appended if it has none)."""
    if not section:
        return text
    old = extract_section(text)
    if old:
        return text.replace(old, section.strip("\n"))
    return text.rstrip("\n") + "\n\n" + section.strip("\n") + "\n"
