"""Typed messages exchanged between devices and the aggregator, and the rules their fields obey.

Every message validates itself on construction (ValueError with a one-line reason), so a
message that exists satisfies docs/PROTOCOL.md: the codec builds them from untrusted headers and
turns these errors into DecodeError, and an encoder cannot be handed a message a receiver would
refuse.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field

from protocol.quant import check_encoding, check_topk
from protocol.tensors import TensorDict

# Integers on the wire (round, num_samples, local_steps, task ids) fit a signed 32-bit integer,
# so every store and every device language holds them without overflow.
MAX_INT32 = 2**31 - 1
# A topic segment (federation, device id) in UTF-8; signed frames bound device ids the same way.
MAX_SEGMENT_BYTES = 255
MAX_METRICS = 16
# Metric values are bounded so that sums weighted by capped sample counts stay finite.
MAX_METRIC_ABS = 1e15
MAX_SHAPE_RANK = 8
_LARGEST_FLOAT = 1.7976931348623157e308  # a JSON number beyond it is no float64
# Problems a device can report in its status (docs/PROTOCOL.md, section 2.1).
STATUS_PROBLEMS = frozenset({"manifest"})

# update_id and manifest_sha256: short ASCII tokens, safe in logs, SQL and file names.
_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_.-]")


def _show(value: object) -> str:
    """A short, ASCII, one-line rendering of a value for error messages."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_text(value: object, what: str) -> str:
    """Return `value` if it is a str that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {_show(value)} is not encodable as UTF-8") from None
    return value


def check_segment(value: object, what: str) -> str:
    """A federation or device id: a topic segment of 1-255 UTF-8 bytes without / + # NUL."""
    text = check_text(value, what)
    if not text or any(c in text for c in "/+#\0"):
        raise ValueError(f"{what} {_show(text)} must be non-empty and free of '/', '+', '#', NUL")
    if len(text.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise ValueError(f"{what} {_show(text)} is over {MAX_SEGMENT_BYTES} bytes of UTF-8")
    return text


def check_token(value: object, what: str) -> str:
    """An update id or manifest hash: 1-64 characters of [A-Za-z0-9_.:-]."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 characters of [A-Za-z0-9_.:-], got {_show(value)}")
    return value


def check_int(value: object, what: str, low: int, high: int = MAX_INT32) -> int:
    """An integer (not a bool, not a float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low}..{high}, got {_show(value)}")
    return value


def check_bool(value: object, what: str) -> bool:
    """A JSON boolean."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be a boolean, got {_show(value)}")
    return value


def check_metrics(metrics: object) -> dict[str, float]:
    """At most 16 metrics, named 1-64 characters of [A-Za-z0-9_.-], finite, |value| <= 1e15."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be an object, got {_show(metrics)}")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{len(metrics)} metrics, over the limit of {MAX_METRICS}")
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name {_show(name)} must be 1-64 characters of "
                             "[A-Za-z0-9_.-]")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {name} must be a number, got {_show(value)}")
        # Compared before any float(): a huge JSON integer must not overflow the conversion.
        if not (isinstance(value, int) or math.isfinite(value)) or abs(value) > MAX_METRIC_ABS:
            raise ValueError(f"metric {name} must be finite with |value| <= {MAX_METRIC_ABS:g}, "
                             f"got {_show(value)}")
        checked[name] = float(value)
    return checked


def check_shape(shape: object, what: str) -> tuple[int, ...]:
    """A dense tensor shape: at most 8 sizes in 0..2^31-1."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_SHAPE_RANK:
        raise ValueError(f"{what} must be a list of at most {MAX_SHAPE_RANK} sizes, "
                         f"got {_show(shape)}")
    return tuple(check_int(d, f"{what} size", 0) for d in shape)


def new_update_id(device_id: str, round_number: int, task: str = "") -> str:
    """A fresh update id, `<device>[-<task>]-<round>-<12 random hex>`, always a valid token.

    Characters of the device id outside [A-Za-z0-9_.-] become "_", and the device part is cut
    to 32 characters; the random part keeps ids unique.
    """
    slot = f"{device_id}-{task}" if task else device_id
    prefix = _NOT_TOKEN.sub("_", slot)[:32]
    return f"{prefix}-{round_number}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """What the aggregator asks each device to do in one round.

    `update_encoding` and `update_topk` choose how devices compress their updates (see
    protocol.quant); the aggregator picks them per federation and devices follow.
    """

    local_steps: int = 20
    learning_rate: float = 0.05
    update_encoding: str = "fp32"
    update_topk: float | None = None

    def __post_init__(self) -> None:
        check_int(self.local_steps, "local_steps", 1)
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (
                0 < rate <= _LARGEST_FLOAT):
            raise ValueError(f"learning_rate must be a positive finite number, got {_show(rate)}")
        if not isinstance(self.update_encoding, str):
            raise ValueError(f"update_encoding must be a string, got {_show(self.update_encoding)}")
        check_encoding(self.update_encoding)
        check_topk(self.update_topk)


# A device's local task slot (FL-TAC): short, and free of the "/" that joins it to the device id.
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def check_task_name(task: str) -> str:
    """Return `task` if it is a valid slot name ("" is the device's only slot); else ValueError."""
    if not isinstance(task, str):
        raise ValueError(f"task slot must be a string, got {_show(task)}")
    if task and not _TASK_NAME.fullmatch(task):
        raise ValueError(f"task slot {_show(task)} must be 1-32 characters of [A-Za-z0-9_.-]")
    return task


def check_slot(slot: object) -> str:
    """A submission slot name: a device id, or `<device>/<task>` (see slot_key)."""
    text = check_text(slot, "slot")
    device_id, sep, task = text.partition("/")
    check_segment(device_id, "slot device id")
    if sep:
        if not task:
            raise ValueError(f"slot {_show(text)} has an empty task name")
        check_task_name(task)
    return text


def slot_key(device_id: str, task: str = "") -> str:
    """Name of one submission slot: the device id, plus "/<task>" for a multi-task device."""
    return f"{device_id}/{task}" if task else device_id


def slot_start_adapter(adapter: TensorDict, clusters: tuple[TensorDict, ...],
                       assignment: dict[str, int], slot: str) -> TensorDict:
    """The adapter a slot trains from: its FL-TAC cluster's if assigned, else the global one."""
    cluster = assignment.get(slot)
    return adapter if cluster is None else clusters[cluster]


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """Aggregator -> devices (retained): the global adapter that opens `round`.

    `final` marks the last message of a federation: devices stop instead of training.
    `residual` (exact aggregation, Fed-TaLoRA) says devices run with frozen weights W0 + R_t,
    R_t being the cumulative residual of the rounds before `round`; `residual_step` holds, per
    LoRA layer, factors `<layer>.U`, `<layer>.V` of R_t − R_(t−1): a device level with round
    t − 1 adds U @ V, any other fetches R_t from the residual topic (ResidualModel).
    `clusters` and `assignment` (FL-TAC only): the cluster adapters, and which cluster each
    submission slot (see slot_key) starts from; slots not assigned start from `adapter`.
    `task_classes` (continual learning, e.g. Fed-TaLoRA): the classes of the current task,
    number `task_index` of the schedule; devices train on their examples of these classes
    only, with the other classes' logits masked.
    """

    federation: str
    round: int
    manifest_sha256: str
    adapter: TensorDict
    train: TrainConfig = field(default_factory=TrainConfig)
    final: bool = False
    residual_step: TensorDict = field(default_factory=dict)
    clusters: tuple[TensorDict, ...] = ()
    assignment: dict[str, int] = field(default_factory=dict)
    task_index: int | None = None
    task_classes: tuple[int, ...] | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        check_segment(self.federation, "federation")
        check_int(self.round, "round", 0)
        check_token(self.manifest_sha256, "manifest_sha256")
        check_bool(self.residual, "residual")
        if self.residual_step and not self.residual:
            raise ValueError("a residual step needs residual = true")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {_show(self.train)}")
        check_bool(self.final, "final")
        if not isinstance(self.assignment, dict):
            raise ValueError(f"assignment must map slots to clusters, got {_show(self.assignment)}")
        for slot, cluster in self.assignment.items():
            check_slot(slot)
            check_int(cluster, f"assignment of {_show(slot)}", 0)
        bad = {slot: c for slot, c in self.assignment.items()
               if not 0 <= c < len(self.clusters)}
        if bad:
            raise ValueError(f"assignment names clusters that do not exist: {_show(bad)}")
        if (self.task_classes is None) != (self.task_index is None):
            raise ValueError("task_index and task_classes come together")
        if self.task_classes is not None:
            check_int(self.task_index, "task_index", 0)
            if not isinstance(self.task_classes, tuple) or not self.task_classes:
                raise ValueError("task_classes must be a non-empty tuple of class ids")
            for c in self.task_classes:
                check_int(c, "task class", 0)

    def start_adapter(self, device_id: str, task: str = "") -> TensorDict:
        """The adapter a slot trains from: its FL-TAC cluster's, else the global one."""
        return slot_start_adapter(self.adapter, self.clusters, self.assignment,
                                  slot_key(device_id, task))


@dataclass(frozen=True, slots=True)
class ResidualModel:
    """Aggregator -> devices (retained, on the residual topic): R_t, the cumulative residual a
    device's frozen weights must hold to train round `round`, for devices not level with
    round t − 1 (new, or back after missing rounds).

    `residual` holds per LoRA layer either factors `<layer>.U`, `<layer>.V` (R = U @ V) or the
    matrix `<layer>.dense`; `truncation_error` is ‖R_t − sent‖_F / ‖R_t‖_F (0: exact), non-zero
    only when the exact R_t does not fit the payload limit.
    """

    federation: str
    round: int
    manifest_sha256: str
    residual: TensorDict
    truncation_error: float = 0.0

    def __post_init__(self) -> None:
        check_segment(self.federation, "federation")
        check_int(self.round, "round", 0)
        check_token(self.manifest_sha256, "manifest_sha256")
        if (isinstance(self.truncation_error, bool) or not isinstance(self.truncation_error,
                                                                        int | float)
                or not 0.0 <= self.truncation_error <= 1.0):
            raise ValueError(f"truncation_error must be a number in [0, 1], got "
                             f"{_show(self.truncation_error)}")


@dataclass(frozen=True, slots=True)
class Update:
    """Device -> aggregator: the adapter a device trained in `round`, from that round's global.

    With `is_delta` the adapter holds local minus global (it compresses far better, and top-k
    drops only small changes); the aggregator adds the round's global back.
    `task` names the device's local task slot (FL-TAC devices send one update per task; "" is
    a device's only slot); deltas are then against that slot's start adapter.
    """

    federation: str
    round: int
    device_id: str
    manifest_sha256: str
    num_samples: int
    update_id: str  # unique per (device, round, attempt); QoS 1 redelivery repeats it
    adapter: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)
    is_delta: bool = False
    task: str = ""

    def __post_init__(self) -> None:
        check_segment(self.federation, "federation")
        check_int(self.round, "round", 0)
        check_segment(self.device_id, "device_id")
        check_token(self.manifest_sha256, "manifest_sha256")
        check_int(self.num_samples, "num_samples", 1)
        check_token(self.update_id, "update_id")
        check_metrics(self.metrics)
        check_bool(self.is_delta, "is_delta")
        check_task_name(self.task)


@dataclass(frozen=True, slots=True)
class PartialSum:
    """Gateway aggregator -> upstream aggregator: one gateway's closed round as a weighted sum.

    `sums` holds Σ_k w_k·x_k per adapter tensor (float64, as the gateway accumulated it) and
    `weight` Σ_k w_k over its `count` accepted updates; `metric_sums` the w-weighted sums of the
    devices' metrics. Merging partial sums is exact (docs/PROTOCOL.md §13), so the upstream
    global equals FedAvg over every device of every gateway.
    """

    federation: str
    round: int
    gateway_id: str
    manifest_sha256: str
    weight: float
    count: int
    sums: TensorDict
    metric_sums: dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    def __post_init__(self) -> None:
        check_segment(self.federation, "federation")
        check_int(self.round, "round", 0)
        check_segment(self.gateway_id, "gateway_id")
        check_token(self.manifest_sha256, "manifest_sha256")
        if not (isinstance(self.weight, float | int) and math.isfinite(self.weight)
                and self.weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {_show(self.weight)}")
        check_int(self.count, "count", 1)
        check_metrics(self.metric_sums)
        check_int(self.bytes, "bytes", 0, 2**62)

    @property
    def update_id(self) -> str:
        """One per gateway and round: a partial sum sent again is a duplicate."""
        return f"{self.gateway_id}.{self.round}"

    @property
    def device_id(self) -> str:
        """The gateway is the upstream round's contributor (its slot)."""
        return self.gateway_id

    task = ""  # a gateway has one slot

    @property
    def num_samples(self) -> int:
        """Updates behind this sum (what the upstream log counts)."""
        return self.count

    @property
    def metrics(self) -> dict[str, float]:
        """The gateway's devices' metrics, weighted means."""
        return {k: v / self.weight for k, v in self.metric_sums.items()}


@dataclass(frozen=True, slots=True)
class Status:
    """Device -> aggregator (retained): a device's presence, and what stops it taking part.

    `problem` is None when the device can train, else one of STATUS_PROBLEMS: "manifest" means
    the device's exported artifacts do not match the global's manifest hash.
    """

    device_id: str
    online: bool
    problem: str | None = None

    def __post_init__(self) -> None:
        check_segment(self.device_id, "device_id")
        check_bool(self.online, "online")
        if self.problem is not None and self.problem not in STATUS_PROBLEMS:
            raise ValueError(f"status problem must be one of {sorted(STATUS_PROBLEMS)}, "
                             f"got {_show(self.problem)}")
