"""Round coordinator: publish the global adapter, collect and validate updates, aggregate, repeat."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

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
    staleness_weight,
    weighted_mean,
)
from protocol import topics
from protocol.codec import (
    RESIDUAL_PREFIX,
    DecodeError,
    decode_status,
    decode_update,
    encode_global,
)
from protocol.manifest import Manifest
from protocol.messages import GlobalModel, TrainConfig, Update
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
SPECIAL_STRATEGIES = (DP_STRATEGY, EXACT_STRATEGY)


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
    seed: int = 0  # of the DP noise

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


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one round (returned to callers and logged)."""

    round: int
    devices: tuple[str, ...]
    samples: int  # sum of aggregation weights: samples, staleness-discounted in async mode
    bytes_received: int
    duration_s: float
    metrics: dict[str, float]


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
        resumed = store.latest()
        if resumed is not None:
            self.round, saved, _ = resumed
            self.adapter, self.base_residual = _split_residual(saved)
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
        message = GlobalModel(
            self.config.federation, self.round, self.manifest_sha256, self.adapter,
            self.config.train, final, self.base_residual,
        )
        self.transport.publish(
            topics.global_topic(self.config.federation), encode_global(message), qos=1, retain=True
        )

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
        if device_id in self.open.reported:
            raise Rejected("duplicate-device", f"{device_id} already reported round {self.round}")
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
        # The global this device started from: the open round's, or (async) an older one.
        stored = None if update.round == self.round else self.store.global_at(update.round)
        base = self.adapter if update.round == self.round else (
            None if stored is None else _split_residual(stored)[0])
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
        state.reported[update.device_id] = update.update_id
        for name, value in update.metrics.items():
            state.metric_sums[name] = state.metric_sums.get(name, 0.0) + value * weight
        state.bytes += len(message.payload)
        # Durable before the MQTT ack: a crash from here on makes the broker redeliver, and
        # the accepted-id table then drops the copy.
        self.store.accept(update.update_id, update.device_id, update.num_samples, weight, state,
                          kept)
        logger.info("round %d: accepted %s (%d samples), %d/%d", self.round, update.device_id,
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
        elif self.config.strategy == EXACT_STRATEGY:
            weight = sum(w for _, w in state.buffer)
            self.adapter, self.base_residual = self._exact_step(state.buffer)
        else:
            weight = sum(w for _, w in state.buffer)
            self.adapter = self._round_strategy()(state.buffer)
        record = RoundRecord(
            round=self.round, devices=tuple(sorted(state.reported)), samples=int(weight),
            bytes_received=state.bytes, duration_s=self.now() - self._opened,
            metrics={k: v / weight for k, v in state.metric_sums.items()},
        )
        self.round += 1
        self.store.save(self.round, self.adapter | _prefixed(self.base_residual),
                        {"closed": list(record.devices)})
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


def _prefixed(residual: TensorDict) -> TensorDict:
    return {RESIDUAL_PREFIX + k: v for k, v in residual.items()}


def _split_residual(saved: TensorDict) -> tuple[TensorDict, TensorDict]:
    """A stored global -> (adapter, residual factors); the store keeps both in one blob."""
    adapter = {k: v for k, v in saved.items() if not k.startswith(RESIDUAL_PREFIX)}
    residual = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in saved.items()
                if k.startswith(RESIDUAL_PREFIX)}
    return adapter, residual


def adapter_distance(a: TensorDict, b: TensorDict) -> float:
    """L2 distance between two adapters (for logs and tests)."""
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))
