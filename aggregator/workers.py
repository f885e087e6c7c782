"""Worker processes on one broker: an MQTT 5 shared subscription spreads a round's updates over
N IngestWorkers, each folding its share into a durable partial sum; the MergingLeader closes the
round from their exact merge and publishes the global. A Supervisor restarts dead workers.

All of them share the state database (so: one gateway host). Its transactions are what make the
merge exact: a worker's group commit checks, under SQLite's write lock, that its round is still
open and that no other worker counted the same slot or update id; the leader reads the partial
sums and stores the next global in one transaction, after which no worker can add to the round.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from aggregator.coordinator import (
    POLL_S,
    Coordinator,
    Handled,
    Rejected,
    RoundRecord,
)
from aggregator.registry import check_mergeable
from aggregator.rounds import GlobalState, RoundAggregator
from aggregator.store import OpenRound, RoundClosed, SlotTaken, StorageError
from protocol import topics
from protocol.messages import Update, slot_key

logger = logging.getLogger(__name__)

# A dead worker is restarted after RESTART_DELAY_S, doubled for each death in a row (one that
# keeps dying, say on a bad state folder, is not restarted in a tight loop) up to the cap; a
# worker that lived STABLE_S starts again from the first delay.
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 120.0
LEADER_POLL_S = 0.02


def share_group(federation: str) -> str:
    """The shared-subscription group of a federation's workers."""
    return f"aggregator-{federation}"


class IngestWorker(Coordinator):
    """Validates and folds the updates the broker hands this worker into its partial sum of the
    open round; never publishes, never closes a round (it follows the leader's through the
    store). Acknowledges each update after the group commit that holds it, like Coordinator."""

    def __init__(self, *args: object, worker: str, **kwargs: object) -> None:
        self.worker = worker  # set first: Coordinator's constructor restores our partial sum
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        check_mergeable(self.config, "--workers")
        # A restarted worker goes on from the counts it stored, which the leader adds up.
        self.rejections.update(self.store.worker_rejections().get(self.worker, {}))
        self._shared = dict(self.rejections)  # the rejection counts the store holds for us

    def _subscriptions(self) -> tuple[str, ...]:
        f = self.config.federation
        return (topics.shared_update_filter(f, share_group(f)),)

    def _round_complete(self) -> bool:
        return False  # the leader closes rounds; a group ends when full or the inbox runs dry

    def _restore_open_round(self) -> tuple[OpenRound, RoundAggregator]:
        saved = self.store.partial(self.round, self.worker)
        if saved is None:
            return OpenRound(self.round), self.family.open(self.state)
        totals, snapshot = saved
        return totals, self.family.restore(self.state, snapshot, [])

    def validate(self, topic: str, payload: bytes) -> Update:
        update = super().validate(topic, payload)
        slot = slot_key(update.device_id, update.task)
        if self.store.slot_reported(self.round, slot):  # counted by another worker
            raise Rejected("duplicate-device", f"{slot} already reported round {self.round}")
        return update

    def _write(self, group: list[Handled]) -> list[Handled]:
        while True:
            rows = [(h.accepted, h.kept) for h in group if h.accepted is not None]
            if not rows:
                return group
            try:
                self.store.accept_partial(self.worker, rows, self.open, self.aggregator.snapshot(),
                                          dict(self.rejections))
                self._shared = dict(self.rejections)
                return group
            except (RoundClosed, SlotTaken) as exc:
                # Lost a race with the leader's close or another worker's commit: back to what
                # the store holds, and hand the group's updates in again (now they are checked
                # against the newer state: stale, or duplicates).
                logger.info("%s: %s; handling its %d updates again", self.worker, exc, len(rows))
                self._follow()
                for handled in group:
                    if handled.accepted is not None:
                        self._fold(handled.message)
                group, self._group = self._group, []
                self._group_ids.clear()

    def _follow(self) -> None:
        """Take the state the store holds: the newest global and our partial sum of its round."""
        latest = self.store.latest()
        assert latest is not None  # the leader stored round 0 before any worker started
        if latest[0] != self.round:
            logger.info("%s: round %d open", self.worker, latest[0])
        self.state = GlobalState.from_tensors(*latest)
        self.open, self.aggregator = self._restore_open_round()
        self._start_clock()

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundRecord]:
        """Fold updates until the federation's last round is closed (or `stop()`)."""
        for topic_filter in self._subscriptions():
            self.transport.subscribe(topic_filter, qos=1)
        # Our row in the store says we subscribed (tests and benchmarks wait for every worker's).
        self.store.record_rejections(self.worker, dict(self.rejections))
        while not stop() and not self._finished():
            message = self.transport.receive(timeout=0 if self._group else POLL_S)
            if self.store.latest_round() != self.round:  # the leader closed our round
                self._flush()
                self._follow()
            self._take(message)
        self._flush()
        return []

    def _commit(self, group: list[Handled]) -> bool:
        stored = super()._commit(group)
        self._share_rejections()
        return stored

    def _share_rejections(self) -> None:
        """Store our rejection counts when they changed without an accepted update (a group
        commit stores them otherwise), so the leader's status page counts them."""
        if dict(self.rejections) == self._shared:
            return
        try:
            self.store.record_rejections(self.worker, dict(self.rejections))
            self._shared = dict(self.rejections)
        except StorageError:  # the next group commit tries again
            pass


class MergingLeader(Coordinator):
    """Closes each round from the `workers` workers' partial sums and publishes the globals; it
    reads device statuses itself, updates only through the workers."""

    # The workers' updates arrive in the store, not in our inbox: look at it often (a count on
    # an index) so a round closes soon after its last update is committed.
    poll_s = LEADER_POLL_S

    def __init__(self, *args: object, workers: int, worker_kind: str = "python",
                 **kwargs: object) -> None:
        # Set first: the base constructor's status snapshot reads them.
        self.workers, self.worker_kind = workers, worker_kind  # kind: python or native
        self._count = 0  # the workers' committed updates in the open round, as last read
        self._worker_rejections: Counter[str] = Counter()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        check_mergeable(self.config, "--workers")
        self._count = self.store.accepted_count(self.round)

    def _subscriptions(self) -> tuple[str, ...]:
        return (topics.status_filter(self.config.federation),)

    def role(self) -> str:
        native = "native " if self.worker_kind == "native" else ""
        return f"leader of {self.workers} {native}worker processes"

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundRecord]:
        """Wait until every worker has subscribed (the first time: the broker keeps no update
        for a share group before it has a member), then run rounds as Coordinator does."""
        waiting = False
        while not stop() and len(self.store.worker_rejections()) < self.workers:
            if not waiting:
                logger.info("waiting for %d worker processes to subscribe", self.workers)
                waiting = True
            time.sleep(POLL_S)
        return super().run(stop)

    def _reported(self) -> int:
        return self._count

    def worker_rejections(self) -> Counter[str]:
        """The workers' rejection counts, added up, as they last stored them."""
        total: Counter[str] = Counter()
        for counts in self.store.worker_rejections().values():
            total.update(counts)
        return total

    def _round_ready(self) -> bool:
        count, rejections = self.store.accepted_count(self.round), self.worker_rejections()
        if (count, rejections) != (self._count, self._worker_rejections):
            self._count, self._worker_rejections = count, rejections
            self._refresh_snapshot()
        return super()._round_ready()

    def _refresh_snapshot(self) -> None:
        super()._refresh_snapshot()
        self._snapshot = replace(self._snapshot, open_updates=self._count,
                                 rejections=dict(self._worker_rejections + self.rejections))

    def _close_round(self) -> RoundRecord:
        try:
            with self.store.transaction():  # from here on, no worker can add to this round
                parts = self.store.partials(self.round)
                totals = [t for t, _ in parts]
                metric_sums: Counter[str] = Counter()
                for t in totals:
                    metric_sums.update(t.metric_sums)
                self.open = OpenRound(self.round, sum(t.weight for t in totals),
                                      dict(metric_sums), sum(t.bytes for t in totals),
                                      self.store.reported(self.round))
                merged = self.family.merge([s for _, s in parts])  # type: ignore[attr-defined]
                self.aggregator = self.family.restore(self.state, merged, [])
                record = super()._close_round()
        except StorageError:
            latest = self.store.latest()
            assert latest is not None
            self.state = GlobalState.from_tensors(*latest)
            self.open, self.aggregator = OpenRound(self.round), self.family.open(self.state)
            raise
        self._count = 0
        return record


class Supervisor:
    """Keeps `count` worker processes running; one that dies with an error is restarted (its
    unacknowledged updates wait in its persistent session, and come back to it)."""

    def __init__(self, command: Callable[[int], list[str]], count: int) -> None:
        self.command, self.count = command, count
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts = 0
        self._started: dict[int, float] = {}
        self._died_at: dict[int, float] = {}
        self._in_a_row: dict[int, int] = {}  # deaths since the worker last lived STABLE_S

    def start(self) -> None:
        """Start every worker."""
        for index in range(self.count):
            self._launch(index)

    def _launch(self, index: int) -> None:
        try:
            self.processes[index] = subprocess.Popen(self.command(index))
        except OSError as exc:  # a missing program, say: retried like a worker that died at once
            logger.error("cannot start aggregator worker %d: %s", index, exc)
            self.processes[index] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(127)"])
        self._started[index] = time.monotonic()

    def poll(self) -> bool:
        """Restart any worker that died with an error (a finished one exits 0 and stays so).
        Returns False, so that it can be a run loop's stop check: the loop's tick."""
        now = time.monotonic()
        for index, process in list(self.processes.items()):
            code = process.poll()
            if code is None or code == 0:
                continue
            if index not in self._died_at:
                self._died_at[index] = now
                lived = now - self._started[index]
                self._in_a_row[index] = 0 if lived >= STABLE_S else self._in_a_row.get(index, 0)
            delay = min(RESTART_DELAY_S * 2 ** self._in_a_row[index], MAX_RESTART_DELAY_S)
            if now - self._died_at[index] < delay:
                continue
            logger.warning("aggregator worker %d exited with code %d; restarting it", index, code)
            del self._died_at[index]
            self._in_a_row[index] += 1
            self._launch(index)
            self.restarts += 1
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every worker to stop (SIGTERM), then kill those still running."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
