"""Round aggregators, one per strategy family; the maths they call are pure functions elsewhere.

- StreamingFamily: FedAvg / FLORA / CoLoRA's shared part, a running weighted sum (O(adapter)).
- BufferedFamily: coordinate-wise median or trimmed mean, which need every update of the round.
- DPFamily: DP-FedAvg with the fixed-denominator estimator and CSPRNG noise; tracks ε spent.
- ExactFamily: FedAvg plus the cumulative low-rank residual (FedEx-LoRA; Fed-TaLoRA's server).
- FLTACFamily: k-means over the task slots' adapters, one adapter per cluster.
- FedBuffFamily: asynchronous buffered aggregation with a staleness discount.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregator import accounting
from aggregator.clustering import carry_assignment, fltac
from aggregator.exact import (
    accumulate_exact,
    catch_up_copy,
    exact_aggregate,
    ledger_rank,
    residual_tensors,
    scaled,
)
from aggregator.privacy import clip_delta, dp_step
from aggregator.rounds import Contribution, GlobalState, Kept, RoundAggregator
from aggregator.strategies import (
    WeightedAdapter,
    WeightedSum,
    accumulate,
    delta,
    fedavg,
    fedbuff_step,
    merge,
    weighted_mean,
)
from protocol.tensors import TensorDict

# Scalars of a running sum travel in its snapshot as 0-d tensors under these names ("/" never
# occurs in adapter tensor names, so they cannot collide).
_WEIGHT, _COUNT = "/weight", "/count"

Strategy = Callable[[Sequence[WeightedAdapter]], TensorDict]


def _next(state: GlobalState, adapter: TensorDict, **changes: object) -> GlobalState:
    """The state that opens the round after `state`'s, with a new adapter (and no residual
    step unless the family gives one)."""
    return replace(state, round=state.round + 1, adapter=adapter,
                   **{"residual_step": {}, **changes})


def sum_snapshot(acc: WeightedSum | None) -> TensorDict:
    """A running sum as tensors (how the store keeps it); {} for no sum yet."""
    if acc is None:
        return {}
    return {**acc.sums, _WEIGHT: np.array(acc.weight), _COUNT: np.array(float(acc.count))}


def sum_restore(snapshot: TensorDict) -> WeightedSum | None:
    """Inverse of sum_snapshot."""
    if not snapshot:
        return None
    sums = {k: v for k, v in snapshot.items() if k not in (_WEIGHT, _COUNT)}
    return WeightedSum(sums, float(snapshot[_WEIGHT].item()), int(snapshot[_COUNT].item()))


# -- streaming FedAvg ------------------------------------------------------------------------
@dataclass
class _StreamingRound:
    state: GlobalState
    acc: WeightedSum | None = None

    def add(self, contribution: Contribution) -> TensorDict | None:
        self.acc = accumulate(self.acc, contribution.adapter, contribution.weight)
        return None

    def snapshot(self) -> TensorDict:
        return sum_snapshot(self.acc)

    def close(self) -> GlobalState:
        assert self.acc is not None
        return _next(self.state, weighted_mean(self.acc))


@dataclass(frozen=True)
class StreamingFamily:
    """FedAvg / FLORA: the sample-weighted mean of the adapters, kept as a running sum."""

    max_staleness: int = 0
    device_metrics: bool = True
    task_slots: bool = False
    folds_residual: bool = False

    def open(self, state: GlobalState) -> RoundAggregator:
        return _StreamingRound(state)

    def restore(self, state: GlobalState, snapshot: TensorDict,
                kept: list[Kept]) -> RoundAggregator:
        return _StreamingRound(state, sum_restore(snapshot))

    def merge(self, snapshots: Sequence[TensorDict]) -> TensorDict:
        """One snapshot holding the sum of several partial sums' snapshots (from worker
        processes or gateways): restoring it closes to the FedAvg of all their updates."""
        acc: WeightedSum | None = None
        for part in (sum_restore(s) for s in snapshots):
            if part is not None:
                acc = part if acc is None else merge(acc, part)
        return sum_snapshot(acc)

    def exhausted(self, state: GlobalState) -> str | None:
        return None

    def facts(self, state: GlobalState) -> dict[str, Any]:
        return {}


# -- rounds that keep every update -------------------------------------------------------------
@dataclass
class _BufferedRound:
    state: GlobalState
    finish: Callable[[GlobalState, list[Kept]], GlobalState]
    kept: list[Kept] = field(default_factory=list)

    def add(self, contribution: Contribution) -> TensorDict | None:
        c = contribution
        self.kept.append(Kept(c.slot, c.weight, c.staleness, c.adapter))
        return c.adapter

    def snapshot(self) -> TensorDict:
        return {}

    def close(self) -> GlobalState:
        return self.finish(self.state, self.kept)


class _Buffered:
    """A family whose round keeps each update's adapter and aggregates them all at the close."""

    max_staleness = 0
    device_metrics = True
    task_slots = False
    folds_residual = False

    def finish(self, state: GlobalState,
               kept: list[Kept]) -> GlobalState:
        raise NotImplementedError

    def open(self, state: GlobalState) -> RoundAggregator:
        return _BufferedRound(state, self.finish)

    def restore(self, state: GlobalState, snapshot: TensorDict,
                kept: list[Kept]) -> RoundAggregator:
        return _BufferedRound(state, self.finish, list(kept))

    def exhausted(self, state: GlobalState) -> str | None:
        return None

    def facts(self, state: GlobalState) -> dict[str, Any]:
        return {}


class BufferedFamily(_Buffered):
    """Byzantine-robust rules (median, trimmed mean) over the whole round's adapters."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def finish(self, state: GlobalState,
               kept: list[Kept]) -> GlobalState:
        return _next(state, self.strategy([(k.tensors, k.weight) for k in kept]))


class ExactFamily(_Buffered):
    """FedAvg plus the residual Σp_k B_k A_k − B̄Ā, added each round to an exact cumulative one.

    `scaling` maps each LoRA layer to its α/r (the manifest's). Devices level with the last
    round add the round's step (rank ≤ (K−1)·r); others fetch the cumulative R_t, sent exactly
    when it fits the payload limit, else truncated with its error shown.
    """

    folds_residual = True

    def __init__(self, scaling: dict[str, float]) -> None:
        self.scaling = scaling

    def finish(self, state: GlobalState, kept: list[Kept]) -> GlobalState:
        adapter, increment = exact_aggregate([(k.tensors, k.weight) for k in kept])
        step = scaled(increment, self.scaling)
        cumulative = accumulate_exact(state.residual, step)
        _, error = catch_up_copy(cumulative)
        info = dict(state.info, residual_rank=ledger_rank(cumulative),
                    truncation_error=error,
                    truncation_error_max=max(error, float(state.info.get("truncation_error_max",
                                                                          0.0))))
        return _next(state, adapter, residual=cumulative, residual_step=residual_tensors(step),
                     info=info)

    def facts(self, state: GlobalState) -> dict[str, Any]:
        keys = ("residual_rank", "truncation_error", "truncation_error_max")
        return {k: state.info[k] for k in keys if k in state.info}


class FLTACFamily(_Buffered):
    """FL-TAC: cluster the slots' adapters into K groups; each slot starts from its group's mean."""

    task_slots = True

    def __init__(self, num_clusters: int, seed: int) -> None:
        self.num_clusters, self.seed = num_clusters, seed

    def finish(self, state: GlobalState,
               kept: list[Kept]) -> GlobalState:
        updates = [(k.tensors, k.weight) for k in kept]
        # A seed per round: reproducible, yet k-means' restarts differ between rounds.
        clustering = fltac(updates, self.num_clusters, seed=self.seed * 100_003 + state.round)
        labels = [int(c) for c in clustering.labels]
        order = sorted(set(labels))  # k-means may leave a cluster empty: renumber 0..K'-1
        first = {c: labels.index(c) for c in order}
        clusters = tuple(clustering.adapters[first[c]] for c in order)
        current = {k.slot: order.index(c) for k, c in zip(kept, labels, strict=True)}
        # Slots never seen (new devices or tasks) start from the mean of every slot.
        return _next(state, fedavg(updates), clusters=clusters,
                     assignment=carry_assignment(state.assignment, current))


class FedBuffFamily(_Buffered):
    """FedBuff (Nguyen et al. 2022): K buffered deltas, each discounted by its staleness."""

    def __init__(self, max_staleness: int, server_lr: float) -> None:
        self.max_staleness, self.server_lr = max_staleness, server_lr

    def open(self, state: GlobalState) -> RoundAggregator:
        return _FedBuffRound(state, self.server_lr)

    def restore(self, state: GlobalState, snapshot: TensorDict,
                kept: list[Kept]) -> RoundAggregator:
        return _FedBuffRound(state, self.server_lr, [(k.tensors, k.staleness) for k in kept])


@dataclass
class _FedBuffRound:
    state: GlobalState
    server_lr: float
    buffered: list[tuple[TensorDict, int]] = field(default_factory=list)

    def add(self, contribution: Contribution) -> TensorDict | None:
        change = delta(contribution.adapter, contribution.start)
        self.buffered.append((change, contribution.staleness))
        return change

    def snapshot(self) -> TensorDict:
        return {}

    def close(self) -> GlobalState:
        return _next(self.state, fedbuff_step(self.state.adapter, self.buffered, self.server_lr))


# -- differential privacy --------------------------------------------------------------------
@dataclass
class _DPRound:
    state: GlobalState
    family: DPFamily
    clipped: WeightedSum | None = None  # Σ of the clipped deltas, each with weight 1

    def add(self, contribution: Contribution) -> TensorDict | None:
        change = clip_delta(contribution.adapter, contribution.start, self.family.clip_norm)
        self.clipped = accumulate(self.clipped, change, 1.0)
        return None

    def snapshot(self) -> TensorDict:
        return sum_snapshot(self.clipped)

    def close(self) -> GlobalState:
        assert self.clipped is not None
        f = self.family
        adapter = dp_step(self.state.adapter, self.clipped.sums, f.expected, f.clip_norm, f.sigma)
        rounds = int(self.state.info.get("dp_rounds", 0)) + 1
        info = dict(self.state.info, dp_rounds=rounds,
                    epsilon=accounting.epsilon(f.sigma, rounds, f.delta))
        return _next(self.state, adapter, info=info)


@dataclass(frozen=True)
class DPFamily:
    """Client-level DP-FedAvg (McMahan et al. 2018) with a fixed denominator `expected`.

    Every round the server aggregates whoever reports (it samples no cohort), so ε is that of
    the Gaussian mechanism composed over the rounds, without amplification by sampling.
    """

    clip_norm: float
    sigma: float
    expected: float
    delta: float
    max_epsilon: float | None = None
    max_staleness: int = 0
    device_metrics: bool = False  # device-reported metrics are not noised: keep them home
    task_slots: bool = False
    folds_residual: bool = False

    def open(self, state: GlobalState) -> RoundAggregator:
        return _DPRound(state, self)

    def restore(self, state: GlobalState, snapshot: TensorDict,
                kept: list[Kept]) -> RoundAggregator:
        return _DPRound(state, self, sum_restore(snapshot))

    def exhausted(self, state: GlobalState) -> str | None:
        if self.max_epsilon is None:
            return None
        rounds = int(state.info.get("dp_rounds", 0)) + 1
        spend = accounting.epsilon(self.sigma, rounds, self.delta)
        if spend <= self.max_epsilon:
            return None
        return (f"privacy budget reached: round {rounds} would bring ε to {spend:.3g} > "
                f"--dp-max-epsilon {self.max_epsilon:g} (δ = {self.delta:g})")

    def facts(self, state: GlobalState) -> dict[str, Any]:
        return {"epsilon": float(state.info.get("epsilon", 0.0)), "delta": self.delta,
                "max_epsilon": self.max_epsilon, "noise_multiplier": self.sigma,
                "dp_rounds": int(state.info.get("dp_rounds", 0))}
