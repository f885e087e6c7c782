"""The round-aggregator protocol: what every strategy family implements, and the state it folds.

A *family* (streaming FedAvg, buffered robust, DP, exact residual, FL-TAC, FedBuff) turns the
accepted updates of one round into the next global state. The coordinator only ever calls this
protocol: it validates and decodes updates, makes each one a Contribution, hands it to the
round's aggregator, persists what the aggregator asks it to, and publishes what `close` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.codec import join_global_tensors, split_global_tensors
from protocol.messages import slot_start_adapter
from protocol.tensors import TensorDict

# JSON-ready facts a family keeps across rounds (saved with each global, restored on restart).
Info = dict[str, Any]
# Store-only tensor prefix of the cumulative residual (the wire global carries only the step).
CUMULATIVE_PREFIX = "cumulative_residual/"


@dataclass(frozen=True, slots=True)
class GlobalState:
    """The model state that opens `round`: what devices start from, plus the family's facts.

    `residual` holds exact aggregation's cumulative residual R_t in wire form (per layer
    `<layer>.U`/`<layer>.V` or `<layer>.dense`, scaled: devices add it to the frozen weight) and
    `residual_step` the factors of R_t − R_(t−1); `clusters` and `assignment` are FL-TAC's
    cluster adapters and slot -> cluster map; `info` is durable, JSON-ready family state (for
    example the privacy budget spent so far).
    """

    round: int
    adapter: TensorDict
    residual: TensorDict = field(default_factory=dict)
    residual_step: TensorDict = field(default_factory=dict)
    clusters: tuple[TensorDict, ...] = ()
    assignment: dict[str, int] = field(default_factory=dict)
    info: Info = field(default_factory=dict)

    def start_adapter(self, slot: str) -> TensorDict:
        """The adapter `slot` trains from in this round: its FL-TAC cluster's, else the global."""
        return slot_start_adapter(self.adapter, self.clusters, self.assignment, slot)

    def tensors(self) -> TensorDict:
        """Every tensor of the state in one flat dict, as the store keeps it."""
        wire = join_global_tensors(self.adapter, self.residual_step, self.clusters)
        return wire | {CUMULATIVE_PREFIX + k: v for k, v in self.residual.items()}

    @classmethod
    def from_tensors(cls, round_number: int, tensors: TensorDict, info: Info) -> GlobalState:
        """Inverse of `tensors`, with the store's info (assignment, family facts)."""
        cumulative = {k.removeprefix(CUMULATIVE_PREFIX): v for k, v in tensors.items()
                      if k.startswith(CUMULATIVE_PREFIX)}
        adapter, step, clusters = split_global_tensors(
            {k: v for k, v in tensors.items() if not k.startswith(CUMULATIVE_PREFIX)})
        assignment = {str(k): int(v) for k, v in dict(info.get("assignment", {})).items()}
        return cls(round_number, adapter, cumulative, step, clusters, assignment,
                   dict(info.get("family", {})))


@dataclass(frozen=True, slots=True)
class Contribution:
    """One accepted update as a family sees it: a full adapter and what it started from.

    `weight` is the aggregation weight the coordinator grants (the update's sample count,
    capped); `staleness` is how many versions old its start is (0 in synchronous rounds).
    """

    slot: str
    adapter: TensorDict
    start: TensorDict
    weight: float
    staleness: int = 0


@dataclass(frozen=True, slots=True)
class Kept:
    """What was persisted for one accepted update whose `add` returned tensors."""

    slot: str
    weight: float
    staleness: int
    tensors: TensorDict


class RoundAggregator(Protocol):
    """Folds one round's contributions into the next global state."""

    def add(self, contribution: Contribution) -> TensorDict | None:
        """Take one accepted update; return tensors to persist with it, or None."""
        ...

    def snapshot(self) -> TensorDict:
        """The running state to persist after each `add` ({} when `add` keeps per-update data)."""
        ...

    def close(self) -> GlobalState:
        """The global state that opens the next round (called once, with ≥ 1 contribution)."""
        ...


class Family(Protocol):
    """A strategy family: opens one RoundAggregator per round and says what rounds it accepts."""

    #: how many versions old an update's start may be (0: only the open round's)
    max_staleness: int
    #: False where per-device metrics must not leave the gateway (differential privacy)
    device_metrics: bool
    #: whether a device may send one update per local task slot (FL-TAC)
    task_slots: bool
    #: whether devices fold a residual into their frozen weights (exact aggregation)
    folds_residual: bool

    def open(self, state: GlobalState) -> RoundAggregator:
        """A fresh aggregator for the round `state` opens."""
        ...

    def restore(self, state: GlobalState, snapshot: TensorDict,
                kept: list[Kept]) -> RoundAggregator:
        """`state`'s round rebuilt after a restart from its last snapshot and, in acceptance
        order, what `add` returned for each update."""
        ...

    def exhausted(self, state: GlobalState) -> str | None:
        """Why no further round may open (e.g. the privacy budget is spent), or None."""
        ...

    def facts(self, state: GlobalState) -> dict[str, Any]:
        """JSON-ready figures worth showing on the status page (ε spent, residual rank...)."""
        ...
