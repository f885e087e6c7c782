"""Typed messages exchanged between devices and the aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.tensors import TensorDict


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """What the aggregator asks each device to do in one round."""

    local_steps: int = 20
    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        if self.local_steps <= 0:
            raise ValueError(f"local_steps must be positive, got {self.local_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """Aggregator -> devices (retained): the global adapter that opens `round`.

    `final` marks the last message of a federation: devices stop instead of training.
    """

    federation: str
    round: int
    manifest_sha256: str
    adapter: TensorDict
    train: TrainConfig = field(default_factory=TrainConfig)
    final: bool = False


@dataclass(frozen=True, slots=True)
class Update:
    """Device -> aggregator: the adapter a device trained in `round`, from that round's global."""

    federation: str
    round: int
    device_id: str
    manifest_sha256: str
    num_samples: int
    update_id: str  # unique per (device, round, attempt); QoS 1 redelivery repeats it
    adapter: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
