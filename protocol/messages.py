"""Typed messages exchanged between devices and the aggregator."""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """Aggregator -> devices (retained): the global adapter that opens `round`.

    `final` marks the last message of a federation: devices stop instead of training.
    `base_residual` (exact aggregation only) holds, per LoRA layer, factors `<layer>.U` and
    `<layer>.V` of the cumulative residual: devices run with frozen weight W0 + U @ V.
    """

    federation: str
    round: int
    manifest_sha256: str
    adapter: TensorDict
    train: TrainConfig = field(default_factory=TrainConfig)
    final: bool = False
    base_residual: TensorDict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Update:
    """Device -> aggregator: the adapter a device trained in `round`, from that round's global.

    With `is_delta` the adapter holds local minus global (it compresses far better, and top-k
    drops only small changes); the aggregator adds the round's global back.
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

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
