"""Round coordinator: publish the global adapter, collect and validate updates, aggregate, repeat."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.exact import catch_up_copy
from aggregator.registry import make_family
from aggregator.robust import clip_update
from aggregator.rounds import Contribution, GlobalState, RoundAggregator
from aggregator.snapshot import GatewaySnapshot, RoundSummary
from aggregator.store import Accepted, GlobalStore, OpenRound, StorageError
from aggregator.strategies import add
from protocol import topics
from protocol.codec import (
    DecodeError,
    PayloadTooLarge,
    decode_status,
    decode_update,
    encode_global,
    encode_residual,
)
from protocol.manifest import Manifest
from protocol.messages import GlobalModel, ResidualModel, Update, slot_key
from protocol.signing import SignatureError, SigningRegistry, open_signed
from protocol.tensors import TensorDict, check_finite, shared
from transport import Received, Transport, TransportError

__all__ = ["AggregatorConfig", "Coordinator", "Rejected", "RoundRecord", "adapter_distance"]

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often the loop wakes to check the deadline when no message arrives
RETRY_STORAGE_S = 2.0  # how often updates that could not be stored are tried again
# Group commit: the messages already received are handled in memory, their accepted updates
# committed in one transaction (one fsync), and only then acknowledged. This caps a group, so a
# steady stream still commits (and acknowledges) regularly.
BATCH_MAX = 128
# One entry per closed round on the status page; totals on /metrics count every round.
MAX_HISTORY_ROUNDS = 1000


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one round (returned to callers and logged)."""

    round: int
    devices: tuple[str, ...]
    samples: int  # sum of aggregation weights: capped samples (DP: updates counted)
    bytes_received: int
    duration_s: float
    metrics: dict[str, float]
    global_bytes: int = 0  # payload of the global that opened the round (what each device got)


class Rejected(Exception):
    """An update that fails validation; `reason` is a short stable label for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Handled:
    """A message handled in memory, acknowledged once its group is committed."""

    message: Received
    accepted: Accepted | None = None  # None: a status or a rejection, nothing to store
    kept: TensorDict | None = None  # what the round aggregator asked to keep of the update
    count: int = 0  # updates in the round once this one is in (for the log line)


class Coordinator:
    """Drives rounds over a Transport. Inject `now` for deterministic tests.

    Which strategy runs is the business of the round aggregator family that
    aggregator.registry builds from the config; the coordinator validates, persists and
    publishes, and names no strategy.

    Raises:
        ValueError: at construction, for a configuration the strategy cannot honour.
    """

    poll_s = POLL_S  # longest wait for a message before the loop looks at the round again

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
        self.family = make_family(config, manifest)
        self.config, self.manifest, self.transport, self.store = config, manifest, transport, store
        self.now = now
        self.on_round = on_round
        self.manifest_sha256 = manifest.sha256
        self.registry = registry  # device id -> Ed25519 public key; None: updates unsigned
        self.rejections: Counter[str] = Counter()
        self.online: set[str] = set()
        self.problems: dict[str, str] = {}  # device -> the problem its status reports
        self.global_bytes = 0  # size of the last global published
        self._history: tuple[RoundSummary, ...] = ()
        # Updates received while the state could not be written: unacknowledged, tried again.
        self._deferred: list[Received] = []
        self._group: list[Handled] = []  # handled since the last commit, in arrival order
        self._group_ids: set[str] = set()  # update ids accepted in it, not yet in the store
        self._storage_error: str | None = None
        self._last_retry = now()
        self._catch_up_cache: tuple[int, bytes] | None = None
        resumed = store.latest()
        if resumed is not None:
            self.state = GlobalState.from_tensors(*resumed)
            logger.info("resuming federation %s at round %d", config.federation, self.round)
        else:
            self.state = GlobalState(0, initial_adapter)
            self._save_state(self.state, [])
        self.open, self.aggregator = self._restore_open_round()
        if self.open.reported:
            logger.info("round %d: %d updates already accepted before the restart",
                        self.round, len(self.open.reported))
        self._exhausted = self.family.exhausted(self.state)  # why no round may open, or None
        self._start_clock()
        self._refresh_snapshot()

    @property
    def round(self) -> int:
        """The round now open (equal to config.rounds when the federation is finished)."""
        return self.state.round

    @property
    def adapter(self) -> TensorDict:
        """The global adapter that opened the current round."""
        return self.state.adapter

    # -- round state -----------------------------------------------------------------------
    def _start_clock(self) -> None:
        self._opened = self.now()
        self._deadline = self._opened + self.config.round_deadline_s

    def _save_state(self, s: GlobalState, closed: list[str]) -> None:
        # Asynchronous updates may start from any of the last max_staleness globals.
        keep = max(self.config.keep_rounds, self.family.max_staleness + 1)
        self.store.save(s.round, s.tensors(),
                        {"closed": closed, "assignment": s.assignment, "family": s.info},
                        forget_before=s.round - keep)

    def _publish_global(self, final: bool = False) -> None:
        """Publish (retained) the residual catch-up, if the family folds one, then the global.

        Raises:
            TransportError: the broker did not take it.
            PayloadTooLarge: a message over the protocol's limit (never published).
        """
        self._last_publish = self.now()
        s, c = self.state, self.config
        if self.family.folds_residual:
            self.transport.publish(topics.residual_topic(c.federation), self._catch_up(), qos=1,
                                   retain=True)
        task_index, task_classes = c.task_at(s.round)
        message = GlobalModel(
            c.federation, s.round, self.manifest_sha256, s.adapter, c.train, final=final,
            residual_step=s.residual_step, clusters=s.clusters, assignment=s.assignment,
            task_index=task_index, task_classes=task_classes, residual=self.family.folds_residual,
        )
        payload = encode_global(message)
        self.global_bytes = len(payload)
        self.transport.publish(topics.global_topic(c.federation), payload, qos=1, retain=True)

    def _catch_up(self) -> bytes:
        """The residual topic's message for the open round (encoded once per round)."""
        if self._catch_up_cache is None or self._catch_up_cache[0] != self.round:
            tensors, error = catch_up_copy(self.state.residual)
            payload = encode_residual(ResidualModel(self.config.federation, self.round,
                                                    self.manifest_sha256, tensors, error))
            self._catch_up_cache = (self.round, payload)
        return self._catch_up_cache[1]

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
        if update.update_id in self._group_ids or self.store.is_accepted(update.update_id):
            raise Rejected("duplicate", f"update {update.update_id} already counted")
        if update.round < self.round - self.family.max_staleness:
            raise Rejected("stale-round", f"{device_id} sent round {update.round} in {self.round}")
        if update.round > self.round:
            raise Rejected("future-round", f"{device_id} sent round {update.round} in {self.round}")
        if update.task and not self.family.task_slots:
            raise Rejected("task", f"{device_id} sent task slot {update.task!r}; this "
                                   "federation trains one adapter per device")
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

    def _contribution(self, update: Update) -> Contribution:
        """The accepted update as its round aggregator sees it (full adapter, start, weight)."""
        slot = slot_key(update.device_id, update.task)
        staleness = self.round - update.round
        if staleness == 0:
            start = self.state.start_adapter(slot)
        else:  # an asynchronous update that started from an older global
            stored = self.store.global_at(update.round)
            if stored is None:
                raise Rejected("stale-round", f"no stored global for round {update.round}")
            start = GlobalState.from_tensors(update.round, stored, {}).adapter
        adapter = add(start, update.adapter) if update.is_delta else update.adapter
        if self.config.clip_norm is not None:
            adapter = clip_update(adapter, start, self.config.clip_norm)
        # Self-reported: capped, so no device can claim the whole round (PROTOCOL.md §5).
        weight = float(min(update.num_samples, self.config.max_samples))
        return Contribution(slot, adapter, start, weight, staleness)

    def handle(self, message: Received) -> bool:
        """Process one message and commit it: status, accepted update, or counted rejection.

        Returns False only when an update could not be written to the state (disk full): it
        must stay unacknowledged and be handed in again later. No message raises. The caller
        acknowledges; the run loop does the same for whole groups of messages.
        """
        self._fold(message)
        group, self._group = self._group, []
        return self._commit(group)

    def _fold(self, message: Received) -> None:
        """Handle one message in memory; it joins the group that the next commit stores."""
        if "/status/" in message.topic:
            self._handle_status(message)
            self._group.append(Handled(message))
            return
        try:
            update = self.validate(message.topic, message.payload)
            contribution = self._contribution(update)
            kept = self.aggregator.add(contribution)
        except Rejected as exc:
            self._reject(message.topic, exc)
            self._group.append(Handled(message))
            return
        except Exception as exc:  # no message may crash the gateway, whatever it holds
            logger.debug("update on %s failed", message.topic, exc_info=True)
            self._reject(message.topic, Rejected("invalid", f"{type(exc).__name__}: {exc}"))
            self._group.append(Handled(message))
            return
        # Changed in place (a round of thousands must not copy its table per update): if the
        # commit fails, the round is rebuilt from the store anyway.
        state = self.open
        state.reported[contribution.slot] = update.update_id
        state.weight += contribution.weight
        state.bytes += len(message.payload)
        if self.family.device_metrics:
            for name, value in update.metrics.items():
                state.metric_sums[name] = (state.metric_sums.get(name, 0.0)
                                           + value * contribution.weight)
        self._group_ids.add(update.update_id)
        accepted = Accepted(update.update_id, contribution.slot, update.num_samples,
                            contribution.weight, contribution.staleness)
        self._group.append(Handled(message, accepted, kept, len(state.reported)))

    def _commit(self, group: list[Handled]) -> bool:
        """Store the group's accepted updates, the round's totals and its aggregator's snapshot
        in one transaction; False if the state disk refused (the round then goes back to what
        the store holds, and the caller keeps those updates unacknowledged)."""
        self._group_ids.clear()
        if any(h.accepted is not None for h in group):
            try:
                group = self._write(group)
            except StorageError as exc:
                self._storage_failed(exc)
                # The aggregator already took the updates: rebuild it from what was stored.
                self.open, self.aggregator = self._restore_open_round()
                self._refresh_snapshot()
                return False
            self._storage_recovered()
            for h in group:
                if h.accepted is not None:
                    logger.info("round %d: accepted %s (%d samples), %d/%d", self.round,
                                h.accepted.slot, h.accepted.num_samples, h.count,
                                self.config.clients_per_round)
        self._refresh_snapshot()
        return True

    def _write(self, group: list[Handled]) -> list[Handled]:
        """Store the group's accepted updates with the round's totals and snapshot; return
        the group as stored (a worker process may have to handle it again, see workers.py).

        Raises:
            StorageError: the database could not be written; nothing was changed.
        """
        rows = [(h.accepted, h.kept) for h in group if h.accepted is not None]
        self.store.accept_batch(rows, self.open, self.aggregator.snapshot())
        return group

    def _flush(self) -> None:
        """Commit the group, then acknowledge its messages in arrival order (the MQTT rule for
        PUBACKs); updates that could not be stored stay unacknowledged, to be tried again."""
        if not self._group:
            return
        group, self._group = self._group, []
        stored = self._commit(group)
        for handled in group:
            if handled.accepted is not None and not stored:
                self._deferred.append(handled.message)
            else:
                self.transport.ack(handled.message)
        if not stored:
            self._last_retry = self.now()

    def _restore_open_round(self) -> tuple[OpenRound, RoundAggregator]:
        """The open round's totals and aggregator as the store has them (a fresh round if
        it holds none for the current round)."""
        saved = self.store.open_round()
        if saved is None or saved[0].round != self.round:
            return OpenRound(self.round), self.family.open(self.state)
        totals, snapshot, kept = saved
        return totals, self.family.restore(self.state, snapshot, kept)

    def _storage_failed(self, exc: StorageError) -> None:
        if self._storage_error is None:  # one line per outage, not one per update
            logger.error("%s; updates stay unacknowledged and are retried every %.0f s",
                         exc, RETRY_STORAGE_S)
        self._storage_error = str(exc)

    def _storage_recovered(self) -> None:
        if self._storage_error is not None:
            logger.warning("the state database is writable again")
            self._storage_error = None

    def _handle_status(self, message: Received) -> None:
        """Presence and problems of a device; the topic, not the payload, names the device."""
        try:
            _, _, device_id = topics.parse_device_topic(message.topic)
            status = decode_status(message.payload)
        except (DecodeError, ValueError) as exc:
            self._reject(message.topic, Rejected("status-malformed", str(exc)))
            return
        if status.device_id != device_id:  # A may not mark B offline from A's own topic
            self._reject(message.topic, Rejected(
                "status-mismatch", f"status for {status.device_id!r} on {device_id!r}'s topic"))
            return
        (self.online.add if status.online else self.online.discard)(device_id)
        previous = self.problems.pop(device_id, None)
        if status.problem is not None:
            self.problems[device_id] = status.problem
            if previous != status.problem:  # counted once per episode, not per retained copy
                self._reject(message.topic, Rejected(status.problem, f"{device_id} reports "
                                                     f"problem {status.problem!r}"))

    def _reject(self, topic: str, exc: Rejected) -> None:
        # Counted now, shown on the status page once its group is committed.
        self.rejections[exc.reason] += 1
        # Redelivered duplicates are expected with QoS 1: not worth a warning.
        log = logger.debug if exc.reason == "duplicate" else logger.warning
        log("rejected update on %s: %s", topic, exc)

    # -- status ----------------------------------------------------------------------------
    def snapshot(self) -> GatewaySnapshot:
        """A consistent picture of the gateway (safe to call from any thread)."""
        return replace(self._snapshot, connected=bool(self.transport.connected))

    def _refresh_snapshot(self) -> None:
        # Built on the coordinator's thread and swapped in with one assignment: readers on
        # other threads see either the old picture or the new one, never a mixture.
        c, s = self.config, self.state
        self._snapshot = GatewaySnapshot(
            federation=c.federation, round=s.round, rounds=c.rounds,
            finished=self._finished(),
            mode=c.mode, strategy=c.strategy, connected=bool(self.transport.connected),
            open_round=self.open.round, open_updates=len(self.open.reported),
            open_bytes=self.open.bytes, clients_per_round=c.clients_per_round,
            min_clients=c.min_clients, online=tuple(sorted(self.online)),
            rejections=dict(self.rejections), family=self.family.facts(s),
            history=self._history, role=self.role(),
        )

    def role(self) -> str:
        """This process's part in a scaled-out deployment, for the status page ("": all)."""
        return ""

    # -- main loop -------------------------------------------------------------------------
    def _reported(self) -> int:
        """How many updates the open round holds."""
        return len(self.open.reported)

    def _round_complete(self) -> bool:
        """Whether the round closes now: every update it waits for, or its deadline and quorum
        (what _round_ready decides, without its logging and deadline extension)."""
        reported = self._reported()
        return reported >= self.config.clients_per_round or (
            reported >= self.config.min_clients and self.now() >= self._deadline)

    def _round_ready(self) -> bool:
        reported = self._reported()
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
        """Aggregate the open round, persist the next global state and open its round.

        Raises:
            StorageError: the new state could not be written; nothing changed (retry later).
        """
        record, weight = self._record(), self.open.weight
        following = self.aggregator.close()
        self._save_state(following, list(record.devices))
        self.state = following
        self.open, self.aggregator = OpenRound(self.round), self.family.open(self.state)
        self._start_clock()
        summary = RoundSummary(record.round, record.devices, float(weight), record.bytes_received,
                               record.duration_s, dict(record.metrics), time.time())
        self._history = (*self._history, summary)[-MAX_HISTORY_ROUNDS:]
        self._exhausted = self.family.exhausted(self.state)
        self._refresh_snapshot()
        return record

    def _record(self) -> RoundRecord:
        """What the open round holds now, as the record of its close."""
        s = self.open
        return RoundRecord(
            round=s.round, devices=tuple(sorted(s.reported)), samples=int(s.weight),
            bytes_received=s.bytes, duration_s=self.now() - self._opened,
            metrics={k: v / s.weight for k, v in s.metric_sums.items()},
            global_bytes=self.global_bytes,
        )

    def _finished(self) -> bool:
        return self.round >= self.config.rounds or self._exhausted is not None

    def _log_stop(self) -> None:
        if self._exhausted is not None:
            logger.warning("federation %s stops at round %d: %s", self.config.federation,
                           self.round, self._exhausted)

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
        except PayloadTooLarge as exc:  # never sent: devices would drop it as malformed
            self._last_publish = self.now()
            logger.error("refusing to publish round %d: %s", self.round, exc)

    def _subscriptions(self) -> tuple[str, ...]:
        """The topic filters this process reads: every device's updates and statuses."""
        f = self.config.federation
        return topics.update_filter(f), topics.status_filter(f)

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundRecord]:
        """Run until `config.rounds` rounds are aggregated (or `stop()` is true)."""
        for topic_filter in self._subscriptions():
            self.transport.subscribe(topic_filter, qos=1)
        records: list[RoundRecord] = []
        if self._finished():
            self._log_stop()
            self._publish_global(final=True)
            return records
        self._publish_global()
        logger.info("round %d open", self.round)
        while not stop():
            # Group commit: decode, check and fold every message already received (waiting
            # only while nothing is left to commit), then commit them in one transaction once
            # the inbox runs dry, the group is full or the round must close, so a round never
            # takes more updates than handling them one at a time would have given it. While
            # the commit syncs, paho's network thread goes on reading the next messages.
            if not self._take(self.transport.receive(timeout=0 if self._group else self.poll_s)):
                continue
            if not self._round_ready():
                if self.now() - self._last_publish > self.config.republish_s:
                    self._republish()
                continue
            try:
                record = self._close_round()
            except StorageError as exc:  # the round stays open until the state can be written
                self._storage_failed(exc)
                time.sleep(RETRY_STORAGE_S)
                continue
            self._storage_recovered()
            records.append(record)
            logger.info("round %d closed: %d devices, %d samples, %d bytes in %.1fs",
                        record.round, len(record.devices), record.samples,
                        record.bytes_received, record.duration_s)
            final = self._finished()
            if final:
                self._log_stop()
                self._publish_final(stop)
            else:
                self._republish()  # on failure the republish timer tries again
            if self.on_round is not None:
                self.on_round(record, self.adapter)
            if final:
                break
        return records

    def _take(self, message: Received | None) -> bool:
        """Fold `message` (if any) into the group; commit the group when the inbox ran dry, it
        is full or the round must close. True once committed: the caller looks at the round."""
        if message is not None:
            self._fold(message)
            if len(self._group) < BATCH_MAX and not self._round_complete():
                return False
        self._flush()
        if self._deferred and self.now() - self._last_retry > RETRY_STORAGE_S:
            self._retry_deferred()
        return True

    def _retry_deferred(self) -> None:
        """Hand in again, as one group, the updates that could not be stored (the group is
        empty here: the loop commits it first)."""
        self._last_retry = self.now()
        deferred, self._deferred = self._deferred, []
        for message in deferred:
            self._fold(message)
        self._flush()

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
