"""Typed messages exchanged between devices and the aggregator."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from protocol.quant import check_encoding, check_topk
from protocol.tensors import TensorDict


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
        if self.local_steps <= 0:
            raise ValueError(f"local_steps must be positive, got {self.local_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        check_encoding(self.update_encoding)
        check_topk(self.update_topk)


# A device's local task slot (FL-TAC): short, and free of the "/" that joins it to the device id.
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def check_task_name(task: str) -> str:
    """Return `task` if it is a valid slot name ("" is the device's only slot); else ValueError."""
    if task and not _TASK_NAME.fullmatch(task):
        raise ValueError(f"task slot {task!r} must be 1-32 characters of [A-Za-z0-9_.-]")
    return task


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
    `base_residual` (exact aggregation only) holds, per LoRA layer, factors `<layer>.U` and
    `<layer>.V` of the cumulative residual: devices run with frozen weight W0 + U @ V.
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
    base_residual: TensorDict = field(default_factory=dict)
    clusters: tuple[TensorDict, ...] = ()
    assignment: dict[str, int] = field(default_factory=dict)
    task_index: int | None = None
    task_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bad = {slot: c for slot, c in self.assignment.items()
               if not 0 <= c < len(self.clusters)}
        if bad:
            raise ValueError(f"assignment names clusters that do not exist: {bad}")
        if (self.task_classes is None) != (self.task_index is None):
            raise ValueError("task_index and task_classes come together")
        if self.task_classes is not None and (
                not self.task_classes or min(self.task_classes) < 0 or self.task_index < 0):
            raise ValueError("task_classes must be non-empty class ids >= 0, task_index >= 0")

    def start_adapter(self, device_id: str, task: str = "") -> TensorDict:
        """The adapter a slot trains from: its FL-TAC cluster's, else the global one."""
        return slot_start_adapter(self.adapter, self.clusters, self.assignment,
                                  slot_key(device_id, task))


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
        check_task_name(self.task)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
