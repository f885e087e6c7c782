"""A federation's results.json as one self-contained HTML page of charts: `report.html`.

`write_report(results_json)` writes `report.html` beside the results.json and returns its path;
`python -m edgefl.report RESULTS_JSON` does the same from a shell. The page loads nothing: its
charts are PNGs drawn by matplotlib's Agg backend and embedded as base64 data URIs, its style is
inline, it has no script, and its Content-Security-Policy forbids any fetch.

The page shows test accuracy and test loss per round, bytes up and down per round, accuracy per
device at the end (when the results carry it), and a summary table: workload, strategy, devices,
rounds, final accuracy, total bytes, rejections and the run's other counters.

The results.json contract (what `edgefl demo` / `edgefl emulate`, i.e. edgefl.demo's
run_federation, writes; every key is optional here and a missing or malformed value shows as "—"
or leaves its chart out, never an error)::

    {
      "broker": "mosquitto",                 # the broker kind the run used
      "data": "fashion-mnist",               # the test data's source
      "config": {                            # FederationConfig as JSON
        "fleet": {"devices": 6, "backends": ["executorch", "onnxruntime"], ...},
        "rounds": 6, "strategy": "fedavg", "workload": "fmnist-cnn", "mode": "sync",
        "update_encoding": "fp32", ...
      },
      "rounds": [                            # one row per scoring; row 0 is the initial adapter
        {"round": 0, "accuracy": 0.0985, "loss": 3.38, "devices": 0,
         "bytes_up": 0, "bytes_down": 0, "seconds": 0.0},
        {"round": 1, "accuracy": 0.7095, "loss": 0.69, "devices": 2,
         "bytes_up": 60547, "bytes_down": 55996, "seconds": 0.56},
        ...
      ],
      "rejections": {"malformed": 2, ...},   # reason -> updates the aggregator refused
      "skipped_rounds": 0, "links_lost": 0,
      "device_accuracy": {"dev-00000": 0.81, "dev-00001": null, ...}     # OPTIONAL, see below
    }

`device_accuracy` (optional: older results lack it): device id -> that device's final model (the
global adapter, its FL-TAC cluster's, plus its personal CoLoRA cores) scored on the held-out test
set weighted by the device's own label mix (edgefl.device_scores), a fraction in [0, 1] like the
rounds' `accuracy`; null (or NaN) for a device that could not be scored. When present and
non-empty the page adds a bar chart (a histogram of the scores when the fleet has more than
MAX_DEVICE_BARS devices).

Accuracy and loss may be NaN (Python's json writes NaN) or null: those points are left out of
the charts and shown as "—". A run with no rounds still gives a valid page, with notes in place
of the charts it cannot draw.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

# No display: the figures are drawn on Agg canvases (never through pyplot, whose global state a
# library should not touch); Agg is also the backend should anything in this process use pyplot.
matplotlib.use("Agg")

REPORT_NAME = "report.html"
MAX_DEVICE_BARS = 40  # more devices than this: a histogram of their accuracies instead of bars
MAX_ROUND_BARS = 30  # more rounds than this: traffic drawn as lines instead of grouped bars
DPI = 160  # PNGs at about twice the size they are shown, for sharp text on dense screens
DASH = "—"

ACCURACY_COLOUR = "#2f6db5"
LOSS_COLOUR = "#d9822b"
UP_COLOUR = "#2a9d8f"
DOWN_COLOUR = "#7b61b8"
DEVICE_COLOUR = "#4a8bd0"
MUTED_COLOUR = "#8a8f98"
MEAN_COLOUR = "#1f2430"

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.edgecolor": "#c9ced6",
    "axes.labelcolor": "#3b4250",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e9ee",
    "grid.linewidth": 0.8,
    "xtick.color": "#5b6270",
    "ytick.color": "#5b6270",
    "legend.frameon": False,
    "svg.fonttype": "none",
}

# The page is static: only inline style and data-URI images, nothing fetched, no script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root{--ink:#1f2430;--muted:#6b7280;--line:#e3e6eb;--card:#fff;--bg:#f4f6f9;--accent:#2f6db5}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 24px 40px}
header h1{font-size:1.55em;margin:0 0 .15em;letter-spacing:-.01em}
header p{margin:0;color:var(--muted)}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:14px;
 margin:22px 0}
.tile{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.tile .label{color:var(--muted);font-size:.85em;text-transform:uppercase;letter-spacing:.04em}
.tile .value{display:block;font-size:1.9em;font-weight:650;margin-top:2px}
.tile .detail{color:var(--muted);font-size:.88em}
.tile.accent{border-top:4px solid var(--accent)}
.up{color:#1e8a4c}.down{color:#b4372f}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;
 padding:14px 16px 10px}
figure.wide{grid-column:1/-1}
figure img{display:block;width:100%;height:auto}
figcaption{font-weight:600;margin-bottom:6px}
figcaption span{font-weight:400;color:var(--muted);font-size:.9em}
.empty{color:var(--muted);padding:36px 0;text-align:center;font-style:italic}
section.summary{background:var(--card);border:1px solid var(--line);border-radius:10px;
 padding:14px 16px 10px}
h2{font-size:1em;margin:0 0 6px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{color:var(--muted);font-weight:500;width:11em;padding-left:0}
tr:last-child th,tr:last-child td{border-bottom:0}
td{font-variant-numeric:tabular-nums}
footer{margin-top:26px;color:var(--muted);font-size:.85em}
"""


# -- reading results.json ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RoundPoint:
    """One row of results.json's rounds; NaN where a value is missing, null or not a number."""

    round: float
    accuracy: float
    loss: float
    devices: float
    bytes_up: float
    bytes_down: float
    seconds: float


@dataclass(slots=True)
class Results:
    """What the page shows, read leniently from a results.json."""

    federation: str
    kind: str  # "demo", "emulate", or whatever directory holds the federation's
    broker: str | None = None
    data: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundPoint] = field(default_factory=list)
    rejections: dict[str, float] = field(default_factory=dict)
    skipped_rounds: float = math.nan
    links_lost: float = math.nan
    device_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def fleet(self) -> dict[str, Any]:
        fleet = self.config.get("fleet")
        return fleet if isinstance(fleet, dict) else {}

    @property
    def training_rounds(self) -> list[RoundPoint]:
        """The rounds that moved bytes: every row after the initial scoring (round 0)."""
        return [r for r in self.rounds if _finite(r.round) and r.round >= 1]

    @property
    def completed_rounds(self) -> int:
        return int(max((r.round for r in self.training_rounds), default=0))

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else math.nan

    @property
    def initial_accuracy(self) -> float:
        return self.rounds[0].accuracy if self.rounds else math.nan

    @property
    def bytes_up(self) -> float:
        return _sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> float:
        return _sum(r.bytes_down for r in self.rounds)

    @property
    def rejected(self) -> float:
        return _sum(self.rejections.values())


def _number(value: Any) -> float:
    """A JSON number as a float; NaN for null, NaN, infinities, booleans, strings and the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _sum(values: Any) -> float:
    """The sum of the finite values (0 when there are none)."""
    return float(sum(v for v in values if _finite(v)))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def load_results(results_json: Path) -> Results:
    """Read a results.json (see the module docstring); raises OSError or ValueError."""
    raw = json.loads(Path(results_json).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        # ValueError, not TypeError: bad content, reported like invalid JSON
        raise ValueError(f"{results_json} does not hold a results object "  # noqa: TRY004
                         f"(found a JSON {type(raw).__name__})")
    path = Path(results_json).resolve()
    config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    rows = raw.get("rounds") if isinstance(raw.get("rounds"), list) else []
    rounds = [
        RoundPoint(*(_number(row.get(key)) for key in
                     ("round", "accuracy", "loss", "devices", "bytes_up", "bytes_down", "seconds")))
        for row in rows if isinstance(row, dict)
    ]
    # rows without a round number take their position, as the demo numbers them
    rounds = [r if _finite(r.round) else RoundPoint(float(i), *_fields(r)[1:])
              for i, r in enumerate(rounds)]
    rejections = raw.get("rejections") if isinstance(raw.get("rejections"), dict) else {}
    devices = raw.get("device_accuracy") if isinstance(raw.get("device_accuracy"), dict) else {}
    return Results(
        federation=_text(raw.get("federation")) or path.parent.name,
        kind=path.parent.parent.name,
        broker=_text(raw.get("broker")),
        data=_text(raw.get("data")),
        config=config,
        rounds=rounds,
        rejections={str(k): _number(v) for k, v in rejections.items()},
        skipped_rounds=_number(raw.get("skipped_rounds")),
        links_lost=_number(raw.get("links_lost")),
        device_accuracy={str(k): _number(v) for k, v in devices.items()},
    )


def _fields(point: RoundPoint) -> tuple[float, ...]:
    return (point.round, point.accuracy, point.loss, point.devices, point.bytes_up,
            point.bytes_down, point.seconds)


# -- formatting ----------------------------------------------------------------------------------
def format_bytes(value: float) -> str:
    """Bytes in SI units: 512 B, 121.1 kB, 3.40 MB; "—" for NaN."""
    if not _finite(value):
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.2f} {unit}" if abs(scaled) < 10 else f"{scaled:.1f} {unit}"
    return f"{value:.0f} B"


def format_percent(value: float) -> str:
    """A fraction as a percentage with one decimal: 0.8335 -> 83.4%; "—" for NaN."""
    return f"{value * 100:.1f}%" if _finite(value) else DASH


def format_count(value: float) -> str:
    return f"{value:,.0f}" if _finite(value) else DASH


def _axis_bytes(value: float, _position: float) -> str:
    """A tick label in bytes without a useless decimal: 60 kB, 12.5 kB."""
    if value == 0:
        return "0"
    number, unit = format_bytes(value).split(" ")
    return f"{float(number):g} {unit}"


# -- charts --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chart:
    """One figure of the page: an embedded PNG, or a note when there is nothing to draw."""

    key: str
    title: str
    subtitle: str
    png: bytes | None
    alt: str
    note: str = ""
    wide: bool = False


def _render(draw: Callable[[Axes], None], size: tuple[float, float]) -> bytes:
    """A PNG of one set of axes, drawn by `draw` with the report's style on the Agg canvas."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=size, dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure.add_subplot())
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, facecolor="white",
                       metadata={"Software": None})
    return buffer.getvalue()


def _round_axis(axes: Axes, rounds: Sequence[float], pad: float = 0.4) -> None:
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    if rounds:
        low, high = min(rounds), max(rounds)
        pad = max(pad, (high - low) * 0.03)
        axes.set_xlim(low - pad, high + pad)


def _line(axes: Axes, xs: Sequence[float], ys: Sequence[float], colour: str,
          label_format: Callable[[float], str]) -> None:
    """A line through the finite points (gaps at NaN), with the last finite point labelled."""
    many = len(xs) > 60
    axes.plot(xs, ys, color=colour, linewidth=2.2, marker=None if many else "o",
              markersize=5, markerfacecolor="white", markeredgewidth=1.8)
    finite = [(x, y) for x, y in zip(xs, ys, strict=True) if _finite(y)]
    if finite:
        x, y = finite[-1]
        axes.plot([x], [y], "o", color=colour, markersize=6)
        axes.annotate(label_format(y), (x, y), xytext=(0, 9), textcoords="offset points",
                      ha="center", va="bottom", fontsize=9.5, fontweight="bold", color=colour)


def _accuracy_chart(results: Results) -> Chart:
    points = [(r.round, r.accuracy) for r in results.rounds]
    title, subtitle = "Test accuracy", "global adapter after each round; round 0 is the start"
    if not any(_finite(y) for _, y in points):
        return Chart("accuracy", title, subtitle, None, "", note="no accuracy recorded")
    xs, ys = zip(*points, strict=True)

    def draw(axes: Axes) -> None:
        _line(axes, xs, ys, ACCURACY_COLOUR, format_percent)
        axes.fill_between(xs, ys, 0, color=ACCURACY_COLOUR, alpha=0.08, linewidth=0)
        axes.set_ylim(0, 1.08)
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        axes.set_ylabel("accuracy")
        _round_axis(axes, xs)

    return Chart("accuracy", title, subtitle, _render(draw, (5.6, 3.1)),
                 "Test accuracy per round")


def _loss_chart(results: Results) -> Chart:
    points = [(r.round, r.loss) for r in results.rounds]
    title, subtitle = "Test loss", "cross-entropy on the test set"
    if not any(_finite(y) for _, y in points):
        return Chart("loss", title, subtitle, None, "", note="no loss recorded")
    xs, ys = zip(*points, strict=True)

    def draw(axes: Axes) -> None:
        _line(axes, xs, ys, LOSS_COLOUR, lambda v: f"{v:.3f}")
        top = max(y for y in ys if _finite(y))
        axes.set_ylim(0, top * 1.18 if top > 0 else 1)
        axes.set_ylabel("loss")
        _round_axis(axes, xs)

    return Chart("loss", title, subtitle, _render(draw, (5.6, 3.1)), "Test loss per round")


def _bytes_chart(results: Results) -> Chart:
    rows = results.training_rounds
    title = "Traffic per round"
    subtitle = "device updates up to the gateway, global adapter down to the fleet"
    if not rows or not any(_finite(r.bytes_up) or _finite(r.bytes_down) for r in rows):
        return Chart("bytes", title, subtitle, None, "", note="no traffic recorded: no round ran")
    xs = [r.round for r in rows]
    up = [r.bytes_up if _finite(r.bytes_up) else 0.0 for r in rows]
    down = [r.bytes_down if _finite(r.bytes_down) else 0.0 for r in rows]

    def draw(axes: Axes) -> None:
        up_label = f"up · {format_bytes(results.bytes_up)} in all"
        down_label = f"down · {format_bytes(results.bytes_down)} in all"
        if len(xs) > MAX_ROUND_BARS:  # bars would be slivers: lines over shaded areas instead
            for ys, colour, label in ((down, DOWN_COLOUR, down_label), (up, UP_COLOUR, up_label)):
                axes.plot(xs, ys, color=colour, linewidth=1.8, label=label)
                axes.fill_between(xs, ys, 0, color=colour, alpha=0.15, linewidth=0)
        else:
            width = 0.4
            axes.bar([x - width / 2 for x in xs], up, width, color=UP_COLOUR, label=up_label)
            axes.bar([x + width / 2 for x in xs], down, width, color=DOWN_COLOUR,
                     label=down_label)
        axes.yaxis.set_major_formatter(FuncFormatter(_axis_bytes))
        axes.set_ylabel("bytes")
        axes.grid(axis="x", visible=False)
        top = max([*up, *down, 1.0])
        axes.set_ylim(0, top * 1.25)
        handles, labels = axes.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("up"))
        axes.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
                    ncols=2, fontsize=9)
        _round_axis(axes, xs, pad=0.7)

    return Chart("bytes", title, subtitle, _render(draw, (5.6, 3.1)),
                 "Bytes up and down per round")


def _device_chart(results: Results) -> Chart | None:
    scores = results.device_accuracy
    if not scores:
        return None
    title = "Accuracy per device"
    finite = [v for v in scores.values() if _finite(v)]
    unscored = len(scores) - len(finite)
    mean = sum(finite) / len(finite) if finite else math.nan
    subtitle = (f"{len(scores)} devices at the end of the run; mean {format_percent(mean)}"
                + (f"; {unscored} not scored" if unscored else ""))
    if not finite:
        return Chart("devices", title, subtitle, None, "", note="no device could be scored")

    if len(scores) > MAX_DEVICE_BARS:
        def draw(axes: Axes) -> None:
            axes.hist(finite, bins=[i / 20 for i in range(21)], color=DEVICE_COLOUR,
                      edgecolor="white", linewidth=0.8)
            axes.axvline(mean, color=MEAN_COLOUR, linestyle="--", linewidth=1.5,
                         label=f"mean {format_percent(mean)}")
            axes.set_xlim(0, 1)
            axes.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
            axes.set_xlabel("accuracy")
            axes.set_ylabel("devices")
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
            axes.legend(loc="upper left")

        return Chart("devices", title, subtitle, _render(draw, (11.4, 3.2)),
                     "Histogram of per-device accuracy", wide=True)

    names = sorted(scores)
    values = [scores[n] for n in names]

    def draw(axes: Axes) -> None:
        positions = range(len(names))
        axes.barh(positions, [v if _finite(v) else 0.0 for v in values],
                  color=[DEVICE_COLOUR if _finite(v) else MUTED_COLOUR for v in values],
                  height=0.66)
        for y, v in zip(positions, values, strict=True):
            axes.annotate(format_percent(v) if _finite(v) else "not scored",
                          (v if _finite(v) else 0.0, y), xytext=(5, 0),
                          textcoords="offset points", va="center", fontsize=9, zorder=4,
                          color="#3b4250" if _finite(v) else MUTED_COLOUR,
                          bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                "edgecolor": "none", "alpha": 0.85})
        axes.axvline(mean, color=MEAN_COLOUR, linestyle="--", linewidth=1.3,
                     label=f"mean {format_percent(mean)}")
        axes.set_yticks(list(positions), names)
        axes.invert_yaxis()
        axes.set_xlim(0, 1.12)
        axes.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        axes.set_xlabel("accuracy")
        axes.grid(axis="y", visible=False)
        axes.legend(loc="lower right", fontsize=9, framealpha=0.9, frameon=True)

    height = min(12.0, max(2.4, 0.34 * len(names) + 1.0))
    return Chart("devices", title, subtitle, _render(draw, (11.4, height)),
                 "Per-device accuracy", wide=True)


def charts(results: Results) -> list[Chart]:
    """The page's figures, in order; those with nothing to draw carry a note instead."""
    found = [_accuracy_chart(results), _loss_chart(results), _bytes_chart(results)]
    devices = _device_chart(results)
    return found + ([devices] if devices else [])


# -- the page ------------------------------------------------------------------------------------
def summary(results: Results) -> list[tuple[str, str]]:
    """The summary table's rows: (label, value), values already formatted."""
    config, fleet = results.config, results.fleet
    planned = _number(config.get("rounds"))
    rounds = str(results.completed_rounds)
    if _finite(planned):
        rounds += f" of {planned:.0f}"
    backends = fleet.get("backends")
    devices = format_count(_number(fleet.get("devices")))
    if isinstance(backends, list) and backends:
        devices += f" ({', '.join(str(b) for b in backends)})"
    reasons = ", ".join(f"{reason} {format_count(count)}"
                        for reason, count in sorted(results.rejections.items()))
    rejected = format_count(results.rejected) + (f" ({reasons})" if reasons else "")
    return [
        ("Workload", _text(config.get("workload")) or DASH),
        ("Strategy", _text(config.get("strategy")) or DASH),
        ("Mode", _text(config.get("mode")) or DASH),
        ("Devices", devices),
        ("Rounds", rounds),
        ("Final accuracy", format_percent(results.final_accuracy)),
        ("Total bytes", format_bytes(results.bytes_up + results.bytes_down)),
        ("Bytes up / down", (f"{format_bytes(results.bytes_up)} / "
                             f"{format_bytes(results.bytes_down)}")),
        ("Rejections", rejected),
        ("Skipped rounds", format_count(results.skipped_rounds)),
        ("Links lost", format_count(results.links_lost)),
        ("Update encoding", _text(config.get("update_encoding")) or DASH),
        ("Data", results.data or DASH),
        ("Broker", results.broker or DASH),
    ]


def _tiles(results: Results) -> str:
    final, initial = results.final_accuracy, results.initial_accuracy
    if _finite(final) and _finite(initial) and len(results.rounds) > 1:
        change = (final - initial) * 100
        css = "up" if change > 0 else "down" if change < 0 else ""
        detail = (f'<span class="{css}">{change:+.1f} pts</span> from '
                  f"{format_percent(initial)} at the start")
    else:
        detail = "no round scored yet" if len(results.rounds) <= 1 else "&nbsp;"
    total = results.bytes_up + results.bytes_down
    rounds = results.training_rounds
    per_round = f"{format_bytes(total / len(rounds))} a round" if rounds else "no round ran"
    planned = _number(results.config.get("rounds"))
    reasons = len(results.rejections)
    tiles = [
        ("Final accuracy", format_percent(final), detail, True),
        ("Rounds", str(results.completed_rounds),
         f"of {planned:.0f} planned" if _finite(planned) else "&nbsp;", False),
        ("Devices", format_count(_number(results.fleet.get("devices"))),
         html.escape(_text(results.config.get("strategy")) or DASH), False),
        ("Total traffic", format_bytes(total), per_round, False),
        ("Rejections", format_count(results.rejected),
         f"{reasons} reason{'s' if reasons != 1 else ''}" if reasons else "none refused", False),
    ]
    return "\n".join(
        f'<div class="tile{" accent" if accent else ""}"><span class="label">{label}</span>'
        f'<span class="value">{value}</span><span class="detail">{detail}</span></div>'
        for label, value, detail, accent in tiles)


def _figure(chart: Chart) -> str:
    caption = (f"<figcaption>{html.escape(chart.title)} "
               f"<span>· {html.escape(chart.subtitle)}</span></figcaption>")
    if chart.png is None:
        body = f'<p class="empty">{html.escape(chart.note)}</p>'
    else:
        data = base64.b64encode(chart.png).decode("ascii")
        body = (f'<img id="chart-{chart.key}" alt="{html.escape(chart.alt)}" '
                f'src="data:image/png;base64,{data}">')
    wide = ' class="wide"' if chart.wide else ""
    return f'<figure id="figure-{chart.key}"{wide}>{caption}{body}</figure>'


def render_html(results: Results, source: str = "results.json") -> str:
    """The whole page as a string."""
    title = f"edgefl report · {results.federation}"
    rows = "\n".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                     for label, value in summary(results))
    workload = _text(results.config.get("workload"))
    facts = [f for f in (results.kind and f"edgefl {results.kind}", workload,
                         results.data and f"data: {results.data}") if f]
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    drawn = charts(results)
    table = (f'<section class="summary" id="summary-card"><h2>Summary</h2>\n'
             f'<table id="summary">\n{rows}\n</table></section>')
    # the table fills the grid cell beside the traffic chart; a wide device chart comes after
    cells = [_figure(c) for c in drawn if not c.wide] + [table]
    cells += [_figure(c) for c in drawn if c.wide]
    figures = "\n".join(cells)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1 id="title">{html.escape(title)}</h1>
<p>{html.escape(" · ".join(facts))}</p>
</header>
<div class="tiles">
{_tiles(results)}
</div>
<div class="charts">
{figures}
</div>
<footer>Generated by edgefl.report from {html.escape(source)} on {generated}.</footer>
</main>
</body>
</html>
"""


def write_report(results_json: Path) -> Path:
    """Write report.html beside `results_json` (a results.json, or the run directory holding
    one) and return its path. Raises OSError when it cannot read or write, ValueError when the
    file is not JSON or not a JSON object."""
    path = Path(results_json)
    if path.is_dir():
        path = path / "results.json"
    results = load_results(path)
    out = path.parent / REPORT_NAME
    out.write_text(render_html(results, source=str(path)), encoding="utf-8")
    return out


# -- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edgefl.report RESULTS_JSON`: write the report, print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m edgefl.report",
        description="Write report.html (self-contained charts and a summary) beside a "
                    "federation's results.json.")
    parser.add_argument("results_json", type=Path, metavar="RESULTS_JSON",
                        help="a results.json written by `edgefl demo` or `edgefl emulate` "
                             "(or the run directory holding one)")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.results_json)
    except FileNotFoundError as error:
        return _fail(parser, f"no such file: {error.filename or args.results_json}")
    except json.JSONDecodeError as error:
        return _fail(parser, f"{args.results_json} is not valid JSON: {error}")
    except UnicodeDecodeError:
        return _fail(parser, f"{args.results_json} is not a UTF-8 text file")
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        return _fail(parser, f"cannot report on {args.results_json}: {reason}")
    print(out)
    return 0


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
