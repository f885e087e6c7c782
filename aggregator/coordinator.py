"""Round coordinator: publish the global adapter, collect and validate updates, aggregate, repeat."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aggregator.clustering import carry_assignment, fltac
from aggregator.exact import exact_aggregate, merge_residuals
from aggregator.privacy import dp_strategy
from aggregator.robust import clip_update
from aggregator.store import GlobalStore, OpenRound
from aggregator.strategies import (
    STRATEGIES,
    Strategy,
    accumulate,
    add,
    apply_mean_delta,
    delta,
    fedavg,
    staleness_weight,
    weighted_mean,
)
from protocol import topics
from protocol.codec import (
    DecodeError,
    decode_status,
    decode_update,
    encode_global,
    join_global_tensors,
    split_global_tensors,
)
from protocol.manifest import Manifest
from protocol.messages import GlobalModel, TrainConfig, Update, slot_key, slot_start_adapter
from protocol.signing import SignatureError, SigningRegistry, open_signed
from protocol.tensors import TensorDict, check_finite, shared
from transport import Received, Transport, TransportError

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the loop wakes to check the deadline when no message arrives
# Strategies computed from a running weighted sum (memory O(adapter)); the others need the
# whole round's updates, which are then kept in the store.
STREAMING_STRATEGIES = ("fedavg", "flora")
DP_STRATEGY = "dp-fedavg"
# FedEx-style exact aggregation: FedAvg plus a residual that devices fold into frozen weights.
EXACT_STRATEGY = "exact"
# Fed-TaLoRA: exact aggregation of one task-agnostic adapter over a schedule of tasks.
TALORA_STRATEGY = "fed-talora"
RESIDUAL_STRATEGIES = (EXACT_STRATEGY, TALORA_STRATEGY)
# FL-TAC: k-means over the (device, task) slots' adapters, one adapter per cluster.
FLTAC_STRATEGY = "fltac"
SPECIAL_STRATEGIES = (DP_STRATEGY, *RESIDUAL_STRATEGIES, FLTAC_STRATEGY)


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Round policy. A round closes when `clients_per_round` devices reported, or at the
    deadline if at least `min_clients` did; below quorum the deadline is extended."""

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
    # Robustness and privacy: clip every update's change to this L2 norm before aggregating;
    # "dp-fedavg" adds Gaussian noise of dp_noise_multiplier * clip_norm / n to the mean.
    clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    seed: int = 0  # of the DP noise and FL-TAC's k-means
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
        if self.strategy not in (*STRATEGIES, *SPECIAL_STRATEGIES):
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from "
                             f"{sorted((*STRATEGIES, *SPECIAL_STRATEGIES))}")
        if self.strategy == DP_STRATEGY and not (self.clip_norm and self.dp_noise_multiplier):
            raise ValueError("dp-fedavg needs clip_norm and dp_noise_multiplier")
        if self.mode == "async" and self.strategy not in STREAMING_STRATEGIES:  # exact too
            raise ValueError("async mode aggregates with FedAvg only")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if self.num_clusters < 1:
            raise ValueError("num_clusters must be at least 1")
        if self.rounds_per_task < 1:
            raise ValueError("rounds_per_task must be at least 1")
        if any(not task or min(task) < 0 for task in self.task_schedule):
            raise ValueError("every task of the schedule needs class ids >= 0")
        if self.strategy == TALORA_STRATEGY and not self.task_schedule:
            raise ValueError("fed-talora needs a task schedule (the classes of each task)")

    def task_at(self, round_number: int) -> tuple[int | None, tuple[int, ...] | None]:
        """(task index, its classes) in force at `round_number`, or (None, None) without one."""
        if not self.task_schedule:
            return None, None
        index = min(round_number // self.rounds_per_task, len(self.task_schedule) - 1)
        return index, tuple(self.task_schedule[index])


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one round (returned to callers and logged)."""

    round: int
    devices: tuple[str, ...]
    samples: int  # sum of aggregation weights: samples, staleness-discounted in async mode
    bytes_received: int
    duration_s: float
    metrics: dict[str, float]
    global_bytes: int = 0  # payload of the global that opened the round (what each device got)


class Rejected(Exception):
    """An update that fails validation; `reason` is a short stable label for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Coordinator:
    """Drives rounds over a Transport. Inject `now` for deterministic tests."""

    def __init__(
        self,
        config: AggregatorConfig,
        manifest: Manifest,
        initial_adapter: TensorDict,
        transport: Transport,
        store: GlobalStore,
        now: Callable[[], float] = time.monotonic,
        on_round: Callable[[RoundRecord, TensorDict], None] | None = None,
        registry: SigningRegistry | None = None,
    ) -> None:
        initial_adapter = shared(initial_adapter)  # personal tensors (CoLoRA cores) never travel
        manifest.check_adapter(initial_adapter, shared_only=True)
        self.config, self.manifest, self.transport, self.store = config, manifest, transport, store
        self.now = now
        self.on_round = on_round
        self.manifest_sha256 = manifest.sha256
        self.registry = registry  # device id -> Ed25519 public key; None: updates unsigned
        self.streaming = config.strategy in STREAMING_STRATEGIES
        self.rng = np.random.default_rng(config.seed)
        self.rejections: Counter[str] = Counter()
        self.online: set[str] = set()
        self.base_residual: TensorDict = {}  # exact aggregation: cumulative residual factors
        self.global_bytes = 0  # size of the last global published
        self.clusters: tuple[TensorDict, ...] = ()  # FL-TAC: cluster adapters ...
        self.assignment: dict[str, int] = {}  # ... and the cluster each slot starts from
        resumed = store.latest()
        if resumed is not None:
            self.round, saved, info = resumed
            self.adapter, self.base_residual, self.clusters = split_global_tensors(saved)
            self.assignment = {str(k): int(v) for k, v in dict(info.get("assignment", {})).items()}
            logger.info("resuming federation %s at round %d", config.federation, self.round)
        else:
            self.round, self.adapter = 0, initial_adapter
            store.save(0, initial_adapter, {"closed": []})
        self.open = store.open_round() or OpenRound(self.round)
        if self.open.reported:
            logger.info("round %d: %d updates already accepted before the restart",
                        self.round, len(self.open.reported))
        self._start_clock()

    # -- round state -----------------------------------------------------------------------
    def _start_clock(self) -> None:
        self._opened = self.now()
        self._deadline = self._opened + self.config.round_deadline_s

    def _publish_global(self, final: bool = False) -> None:
        self._last_publish = self.now()
        task_index, task_classes = self.config.task_at(self.round)
        message = GlobalModel(
            self.config.federation, self.round, self.manifest_sha256, self.adapter,
            self.config.train, final, self.base_residual, self.clusters, self.assignment,
            task_index, task_classes,
        )
        payload = encode_global(message)
        self.global_bytes = len(payload)
        self.transport.publish(topics.global_topic(self.config.federation), payload, qos=1,
                               retain=True)

    # -- validation ------------------------------------------------------------------------
    def validate(self, topic: str, payload: bytes) -> Update:
        """Decode and check one update; raise Rejected with the reason. Never mutates state."""
        try:
            federation, _, device_id = topics.parse_device_topic(topic)
        except ValueError as exc:
            raise Rejected("malformed", str(exc)) from exc
        if self.registry is not None:
            try:
                payload = open_signed(self.registry, device_id, payload)
            except SignatureError as exc:
                raise Rejected(f"signature-{exc.reason}", str(exc)) from exc
        try:
            update = decode_update(payload)
        except (DecodeError, ValueError) as exc:
            raise Rejected("malformed", str(exc)) from exc
        if update.federation != self.config.federation or federation != update.federation:
            raise Rejected("federation", f"update for {update.federation!r}")
        if update.device_id != device_id:
            raise Rejected("device-mismatch", f"{update.device_id!r} sent on {device_id!r}'s topic")
        allowed = self.config.allowed_devices
        if allowed is not None and device_id not in allowed:
            raise Rejected("unknown-device", device_id)
        if update.manifest_sha256 != self.manifest_sha256:
            raise Rejected("manifest", f"{device_id} trains another model version")
        if self.store.is_accepted(update.update_id):
            raise Rejected("duplicate", f"update {update.update_id} already counted")
        oldest = self.round - (self.config.max_staleness if self.config.mode == "async" else 0)
        if update.round < oldest:
            raise Rejected("stale-round", f"{device_id} sent round {update.round} in {self.round}")
        if update.round > self.round:
            raise Rejected("future-round", f"{device_id} sent round {update.round} in {self.round}")
        if update.task and self.config.strategy != FLTAC_STRATEGY:
            raise Rejected("task", f"{device_id} sent task slot {update.task!r}; only fltac "
                                   "federations train one adapter per task")
        slot = slot_key(device_id, update.task)
        if slot in self.open.reported:
            raise Rejected("duplicate-device", f"{slot} already reported round {self.round}")
        try:
            # shared_only: an update carrying a personal tensor is refused, not just ignored.
            self.manifest.check_adapter(update.adapter, shared_only=True)
            check_finite(update.adapter)
        except ValueError as exc:
            raise Rejected("tensors", str(exc)) from exc
        return update

    def handle(self, message: Received) -> None:
        """Process one received message: status, accepted update, or logged rejection."""
        if "/status/" in message.topic:
            try:
                device_id, online = decode_status(message.payload)
            except DecodeError as exc:
                logger.warning("ignored status on %s: %s", message.topic, exc)
                return
            (self.online.add if online else self.online.discard)(device_id)
            return
        try:
            update = self.validate(message.topic, message.payload)
        except Rejected as exc:
            self.rejections[exc.reason] += 1
            # Redelivered duplicates are expected with QoS 1: not worth a warning.
            log = logger.debug if exc.reason == "duplicate" else logger.warning
            log("rejected update on %s: %s", message.topic, exc)
            return
        state = self.open
        slot = slot_key(update.device_id, update.task)
        # The adapter this slot started from: the open round's (its FL-TAC cluster's), or
        # (async) an older global.
        if update.round == self.round:
            base = slot_start_adapter(self.adapter, self.clusters, self.assignment, slot)
        else:
            stored = self.store.global_at(update.round)
            base = None if stored is None else split_global_tensors(stored)[0]
        if base is None:
            self.rejections["stale-round"] += 1
            logger.warning("no stored global for round %d; dropped %s", update.round,
                           update.update_id)
            return
        adapter = add(base, update.adapter) if update.is_delta else update.adapter
        if self.config.clip_norm is not None:
            adapter = clip_update(adapter, base, self.config.clip_norm)
        kept = None
        if self.config.mode == "async":
            # FedBuff sums deltas against the global each device started from, discounted by
            # how many versions old that global is.
            weight = update.num_samples * staleness_weight(self.round - update.round)
            state.sums = accumulate(state.sums, delta(adapter, base), weight)
        elif self.streaming:
            weight = float(update.num_samples)
            state.sums = accumulate(state.sums, adapter, weight)
        else:
            weight = float(update.num_samples)
            state.buffer.append((adapter, weight))
            kept = adapter
        state.reported[slot] = update.update_id
        for name, value in update.metrics.items():
            state.metric_sums[name] = state.metric_sums.get(name, 0.0) + value * weight
        state.bytes += len(message.payload)
        # Durable before the MQTT ack: a crash from here on makes the broker redeliver, and
        # the accepted-id table then drops the copy.
        self.store.accept(update.update_id, slot, update.num_samples, weight, state, kept)
        logger.info("round %d: accepted %s (%d samples), %d/%d", self.round, slot,
                    update.num_samples, len(state.reported), self.config.clients_per_round)

    # -- main loop -------------------------------------------------------------------------
    def _round_ready(self) -> bool:
        reported = len(self.open.reported)
        if reported >= self.config.clients_per_round:
            return True
        if self.now() < self._deadline:
            return False
        if reported >= self.config.min_clients:
            logger.info("round %d: deadline passed with %d updates", self.round, reported)
            return True
        logger.warning("round %d: deadline passed with %d < %d updates; extending", self.round,
                       reported, self.config.min_clients)
        self._deadline = self.now() + self.config.round_deadline_s
        return False

    def _close_round(self) -> RoundRecord:
        state = self.open
        if self.config.mode == "async":
            assert state.sums is not None
            weight = state.sums.weight
            self.adapter = apply_mean_delta(self.adapter, state.sums, self.config.server_lr)
        elif self.streaming:
            assert state.sums is not None
            weight = state.sums.weight
            self.adapter = weighted_mean(state.sums)
        elif self.config.strategy in RESIDUAL_STRATEGIES:
            weight = sum(w for _, w in state.buffer)
            self.adapter, self.base_residual = self._exact_step(state.buffer)
        elif self.config.strategy == FLTAC_STRATEGY:
            weight = sum(w for _, w in state.buffer)
            self._fltac_step(list(state.reported), state.buffer)
        else:
            weight = sum(w for _, w in state.buffer)
            self.adapter = self._round_strategy()(state.buffer)
        record = RoundRecord(
            round=self.round, devices=tuple(sorted(state.reported)), samples=int(weight),
            bytes_received=state.bytes, duration_s=self.now() - self._opened,
            metrics={k: v / weight for k, v in state.metric_sums.items()},
            global_bytes=self.global_bytes,
        )
        self.round += 1
        self.store.save(self.round,
                        join_global_tensors(self.adapter, self.base_residual, self.clusters),
                        {"closed": list(record.devices), "assignment": self.assignment})
        self.open = OpenRound(self.round)
        self._start_clock()
        return record

    def _exact_step(self, updates: list[tuple[TensorDict, float]]) -> tuple[TensorDict, TensorDict]:
        """FedAvg adapter and the new cumulative residual (scaled factors, per LoRA layer)."""
        adapter, residual = exact_aggregate(updates)
        scaling = float(self.manifest.lora["alpha"]) / float(self.manifest.lora["r"])
        scaled = {layer: (scaling * u, v) for layer, (u, v) in residual.items()}
        previous = {layer: (self.base_residual[f"{layer}.U"], self.base_residual[f"{layer}.V"])
                    for layer in scaled if f"{layer}.U" in self.base_residual}
        merged = merge_residuals([previous, scaled]) if previous else scaled
        return adapter, {f"{layer}.{part}": factor.astype(np.float32)
                         for layer, (u, v) in merged.items()
                         for part, factor in (("U", u), ("V", v))}

    def _fltac_step(self, slots: list[str], updates: list[tuple[TensorDict, float]]) -> None:
        """Cluster the round's slot adapters; new clusters, assignment and all-slot mean."""
        # A seed per round: reproducible, yet k-means' restarts differ between rounds.
        clustering = fltac(updates, self.config.num_clusters,
                           seed=self.config.seed * 100_003 + self.round)
        labels = [int(c) for c in clustering.labels]
        order = sorted(set(labels))  # k-means may leave a cluster empty: renumber 0..K'-1
        first = {c: labels.index(c) for c in order}
        self.clusters = tuple(clustering.adapters[first[c]] for c in order)
        current = {slot: order.index(c) for slot, c in zip(slots, labels, strict=True)}
        self.assignment = carry_assignment(self.assignment, current)
        # Slots never seen (new devices or tasks) start from the mean of every slot.
        self.adapter = fedavg(updates)
        logger.info("round %d: FL-TAC clusters of sizes %s", self.round,
                    [labels.count(c) for c in order])

    def _round_strategy(self) -> Strategy:
        """The strategy for the round being closed (some depend on its global)."""
        cfg = self.config
        if cfg.strategy == DP_STRATEGY:
            assert cfg.clip_norm is not None and cfg.dp_noise_multiplier is not None
            return dp_strategy(self.adapter, cfg.clip_norm, cfg.dp_noise_multiplier, self.rng)
        return STRATEGIES[cfg.strategy]

    def _republish(self) -> None:
        # Publishing while paho reconnects can block it indefinitely (paho issues #613, #531):
        # wait for the link instead; the timer brings us back here.
        if not self.transport.connected:
            self._last_publish = self.now()
            return
        try:
            self._publish_global()
        except TransportError as exc:  # broker down: paho reconnects, try again later
            self._last_publish = self.now()
            logger.warning("could not republish round %d: %s", self.round, exc)

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundRecord]:
        """Run until `config.rounds` rounds are aggregated (or `stop()` is true)."""
        self.transport.subscribe(topics.update_filter(self.config.federation), qos=1)
        self.transport.subscribe(topics.status_filter(self.config.federation), qos=1)
        records: list[RoundRecord] = []
        if self.round >= self.config.rounds:
            self._publish_global(final=True)
            return records
        self._publish_global()
        logger.info("round %d open", self.round)
        while not stop():
            message = self.transport.receive(timeout=POLL_S)
            if message is not None:
                self.handle(message)
                self.transport.ack(message)
            if not self._round_ready():
                if self.now() - self._last_publish > self.config.republish_s:
                    self._republish()
                continue
            record = self._close_round()
            records.append(record)
            logger.info("round %d closed: %d devices, %d samples, %d bytes in %.1fs",
                        record.round, len(record.devices), record.samples,
                        record.bytes_received, record.duration_s)
            final = self.round >= self.config.rounds
            if final:
                self._publish_final(stop)
            else:
                self._republish()  # on failure the republish timer tries again
            if self.on_round is not None:
                self.on_round(record, self.adapter)
            if final:
                break
        return records

    def _publish_final(self, stop: Callable[[], bool]) -> None:
        # Devices wait for the final message to stop: keep trying through a broker outage.
        while not stop():
            if self.transport.connected:
                try:
                    self._publish_global(final=True)
                    return
                except TransportError as exc:
                    logger.warning("could not publish the final global yet: %s", exc)
            time.sleep(1.0)


def adapter_distance(a: TensorDict, b: TensorDict) -> float:
    """L2 distance between two adapters (for logs and tests)."""
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))
