"""A federation's configuration as the gateway runs it: round policy and strategy settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import TrainConfig

# Each update's aggregation weight is its self-reported sample count, capped here: a device
# cannot buy the round by claiming 2^62 samples (PROTOCOL.md §5 says what num_samples means).
DEFAULT_MAX_SAMPLES = 100_000


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Round policy and strategy settings. A round closes when `clients_per_round` updates
    arrived, or at the deadline if at least `min_clients` did; below quorum the deadline is
    extended. Which settings a strategy accepts is checked by aggregator.registry."""

    federation: str = "demo"
    rounds: int = 5
    clients_per_round: int = 3
    min_clients: int = 2
    round_deadline_s: float = 120.0
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: str = "fedavg"
    allowed_devices: frozenset[str] | None = None  # None: any device id may take part
    # The global is retained, but a broker restarted without persistence forgets it; sending it
    # again now and then lets devices that connect after such a restart find the open round.
    republish_s: float = 30.0
    # "sync": rounds as above. "async": FedBuff -- every `clients_per_round` accepted updates
    # make a new version; updates up to `max_staleness` versions old still count, discounted.
    mode: str = "sync"
    max_staleness: int = 4
    server_lr: float = 1.0
    max_samples: int = DEFAULT_MAX_SAMPLES  # cap on one update's aggregation weight
    # The state keeps the globals (and the updates kept for buffered strategies) of this many
    # recent rounds; older ones are pruned so the state stays bounded however long it runs.
    keep_rounds: int = 10
    # Robustness: clip every update's change to this L2 norm before aggregating.
    clip_norm: float | None = None
    trim_beta: float = 0.2  # trimmed_mean: the fraction trimmed at each end
    # dp-fedavg: Gaussian noise of dp_noise_multiplier * clip_norm / clients_per_round on the
    # mean; the federation stops before a round that would spend more than dp_max_epsilon.
    dp_noise_multiplier: float | None = None
    dp_delta: float = 1e-5
    dp_max_epsilon: float | None = None
    seed: int = 0  # of FL-TAC's k-means only (never of privacy noise)
    num_clusters: int = 2  # FL-TAC's K: how many tasks the federation's slots serve
    # Continual learning: the classes of each task in order, each trained for rounds_per_task
    # rounds (the last one until the end). Globals name the current task's classes.
    task_schedule: tuple[tuple[int, ...], ...] = ()
    rounds_per_task: int = 1

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ValueError("rounds must be positive")
        if not 1 <= self.min_clients <= self.clients_per_round:
            raise ValueError("need 1 <= min_clients <= clients_per_round")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if not self.server_lr > 0:
            raise ValueError("server_lr must be positive")
        if self.max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        if self.keep_rounds < 1:
            raise ValueError("keep_rounds must be at least 1")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if not 0 < self.dp_delta < 1:
            raise ValueError("dp_delta must be in (0, 1)")
        if self.dp_max_epsilon is not None and not self.dp_max_epsilon > 0:
            raise ValueError("dp_max_epsilon must be positive")
        if self.num_clusters < 1:
            raise ValueError("num_clusters must be at least 1")
        if self.rounds_per_task < 1:
            raise ValueError("rounds_per_task must be at least 1")
        if any(not task or min(task) < 0 for task in self.task_schedule):
            raise ValueError("every task of the schedule needs class ids >= 0")

    def task_at(self, round_number: int) -> tuple[int | None, tuple[int, ...] | None]:
        """(task index, its classes) in force at `round_number`, or (None, None) without one."""
        if not self.task_schedule:
            return None, None
        index = min(round_number // self.rounds_per_task, len(self.task_schedule) - 1)
        return index, tuple(self.task_schedule[index])
