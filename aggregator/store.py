"""Durable aggregator state in SQLite (WAL): globals, the open round's state, accepted ids.

Accepted updates are committed in groups, one transaction each (every update's id, slot and what
its round aggregator keeps of it, and the aggregator's snapshot after the last of them), before
any of their MQTT deliveries is acknowledged. After a crash at any point the broker therefore
redelivers exactly the updates that are not yet counted, and the id table drops any it sees
again.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from aggregator.rounds import Kept
from protocol.tensors import TensorDict

DB_FILE = "aggregator.sqlite"
# Bumped when the tables change; a state folder of another version is refused, not misread.
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS globals (
    round INTEGER PRIMARY KEY, adapter BLOB NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS open_round (
    id INTEGER PRIMARY KEY CHECK (id = 0), round INTEGER NOT NULL, snapshot BLOB,
    weight REAL NOT NULL, metric_sums TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accepted (
    update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, device_id TEXT NOT NULL, -- or slot
    num_samples INTEGER NOT NULL, weight REAL NOT NULL, staleness INTEGER NOT NULL,
    adapter BLOB);
-- A slot reports once per round, whichever worker process takes its update.
CREATE UNIQUE INDEX IF NOT EXISTS accepted_slot ON accepted (round, device_id);
-- Worker processes (aggregator.workers): each one's durable partial sum of each round.
CREATE TABLE IF NOT EXISTS partials (
    round INTEGER NOT NULL, worker TEXT NOT NULL, snapshot BLOB, weight REAL NOT NULL,
    metric_sums TEXT NOT NULL, bytes INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (round, worker));
-- A gateway under an upstream aggregator (aggregator.tiers): rounds whose partial sum it sent.
CREATE TABLE IF NOT EXISTS sealed (round INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS worker_rejections (worker TEXT PRIMARY KEY, counts TEXT NOT NULL);
"""


class StorageError(RuntimeError):
    """The state database could not be written (disk full, read-only, I/O error)."""


class RoundClosed(RuntimeError):
    """A worker's group came too late: the leader closed its round meanwhile."""


class SlotTaken(RuntimeError):
    """Another worker committed an update of the same slot (or the same id) first."""


@dataclass
class OpenRound:
    """The round being collected: who reported, and the totals the coordinator keeps."""

    round: int
    weight: float = 0.0  # sum of the accepted updates' aggregation weights
    metric_sums: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    reported: dict[str, str] = field(default_factory=dict)  # slot -> update id


@dataclass(frozen=True, slots=True)
class Accepted:
    """One accepted update as the store records it."""

    update_id: str
    slot: str
    num_samples: int
    weight: float
    staleness: int


class GlobalStore:
    """SQLite file `aggregator.sqlite` in `folder`; one writer (the coordinator)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / DB_FILE, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed update survives power loss
        # Worker processes and their leader share the file: a writer waits for the lock.
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        tables = self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if tables and version != SCHEMA_VERSION:
            self.db.close()
            raise ValueError(f"{self.folder / DB_FILE} was written by another edgefl version "
                             f"(schema {version}, this one reads {SCHEMA_VERSION}): move it away "
                             "or use another --state-dir")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # -- globals ---------------------------------------------------------------------------
    def save(self, round_number: int, adapter: TensorDict, info: dict[str, object],
             forget_before: int | None = None) -> None:
        """Persist the global state that opens `round_number` and start that round empty; with
        `forget_before`, in the same transaction, forget what rounds before it no longer need:
        their globals and the updates kept for them (update ids stay, for duplicates).

        Raises:
            StorageError: the database could not be written; nothing was changed.
        """
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO globals VALUES (?, ?, ?)",
                            (round_number, save_tensors(adapter), json.dumps(info)))
            self.db.execute(
                "INSERT OR REPLACE INTO open_round VALUES (0, ?, NULL, 0, '{}', 0)",
                (round_number,))
            if forget_before is not None:
                self.db.execute("DELETE FROM globals WHERE round < ? AND round <> ?",
                                (forget_before, round_number))
                self.db.execute("UPDATE accepted SET adapter = NULL WHERE round < ? AND "
                                "adapter IS NOT NULL", (forget_before,))

    def latest(self) -> tuple[int, TensorDict, dict[str, object]] | None:
        """(round, tensors, info) of the newest global, or None for a fresh store."""
        row = self.db.execute(
            "SELECT round, adapter, info FROM globals ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return int(row[0]), load_tensors(row[1]), json.loads(row[2])

    def global_at(self, round_number: int) -> TensorDict | None:
        """The global tensors that opened `round_number`, if stored."""
        row = self.db.execute("SELECT adapter FROM globals WHERE round = ?",
                              (round_number,)).fetchone()
        return None if row is None else load_tensors(row[0])

    def history(self) -> list[int]:
        """Rounds whose global is stored."""
        return [r for (r,) in self.db.execute("SELECT round FROM globals ORDER BY round")]

    # -- the open round --------------------------------------------------------------------
    def open_round(self) -> tuple[OpenRound, TensorDict, list[Kept]] | None:
        """The round being collected: its totals, its aggregator's last snapshot, and what
        was kept per update (in acceptance order)."""
        row = self.db.execute("SELECT round, snapshot, weight, metric_sums, bytes "
                              "FROM open_round WHERE id = 0").fetchone()
        if row is None:
            return None
        round_number, snapshot, weight, metric_sums, nbytes = row
        rows = self.db.execute(
            "SELECT device_id, update_id, weight, staleness, adapter FROM accepted "
            "WHERE round = ? ORDER BY rowid", (round_number,)).fetchall()
        reported = {slot: update for slot, update, _, _, _ in rows}
        kept = [Kept(slot, float(w), int(s), load_tensors(blob))
                for slot, _, w, s, blob in rows if blob is not None]
        state = OpenRound(int(round_number), float(weight), json.loads(metric_sums), int(nbytes),
                          reported)
        return state, ({} if snapshot is None else load_tensors(snapshot)), kept

    def accept_batch(self, updates: Sequence[tuple[Accepted, TensorDict | None]],
                     state: OpenRound, snapshot: TensorDict) -> None:
        """Atomically record accepted updates (each with what the aggregator asked to keep of
        it, if anything), the round's totals after them and its aggregator's snapshot.

        Raises:
            StorageError: the database could not be written; nothing was changed.
        """
        rows = [(u.update_id, state.round, u.slot, u.num_samples, u.weight, u.staleness,
                 None if kept is None else _blob(kept)) for u, kept in updates]
        snap = _blob(snapshot) if snapshot else None
        with self.transaction():
            self.db.executemany("INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute(
                "UPDATE open_round SET snapshot = ?, weight = ?, metric_sums = ?, bytes = ? "
                "WHERE id = 0", (snap, state.weight, json.dumps(state.metric_sums), state.bytes))

    def accepted_adapters(self, round_number: int) -> list[tuple[TensorDict, float]]:
        """(tensors, weight) of the updates kept for `round_number` (buffered strategies)."""
        rows = self.db.execute("SELECT adapter, weight FROM accepted WHERE round = ? AND "
                               "adapter IS NOT NULL ORDER BY rowid", (round_number,))
        return [(load_tensors(blob), float(weight)) for blob, weight in rows]

    def accepted_by_slot(self, round_number: int) -> dict[str, tuple[TensorDict, float]]:
        """Slot (device id, or device/task for FL-TAC) -> (tensors, weight) of kept updates."""
        rows = self.db.execute("SELECT device_id, adapter, weight FROM accepted WHERE round = ? "
                               "AND adapter IS NOT NULL ORDER BY rowid", (round_number,))
        return {slot: (load_tensors(blob), float(weight)) for slot, blob, weight in rows}

    def is_accepted(self, update_id: str) -> bool:
        """Whether an update id was ever counted (in any round)."""
        return self.db.execute("SELECT 1 FROM accepted WHERE update_id = ?",
                               (update_id,)).fetchone() is not None

    def accepted_count(self, round_number: int) -> int:
        """How many updates were accepted in `round_number`."""
        (count,) = self.db.execute("SELECT COUNT(*) FROM accepted WHERE round = ?",
                                   (round_number,)).fetchone()
        return int(count)

    # -- worker processes (aggregator.workers) ----------------------------------------------
    def latest_round(self) -> int | None:
        """The round the newest stored global opens (cheap: workers ask before every update)."""
        (value,) = self.db.execute("SELECT MAX(round) FROM globals").fetchone()
        return None if value is None else int(value)

    def slot_reported(self, round_number: int, slot: str) -> bool:
        """Whether any worker counted an update of `slot` in `round_number`."""
        return self.db.execute("SELECT 1 FROM accepted WHERE round = ? AND device_id = ?",
                               (round_number, slot)).fetchone() is not None

    def accept_partial(self, worker: str, updates: Sequence[tuple[Accepted, TensorDict | None]],
                       state: OpenRound, snapshot: TensorDict, rejections: dict[str, int]) -> None:
        """A worker's group commit: its accepted updates, its partial sum of the round after
        them and its rejection counts, in one transaction that also checks the round is open.

        Raises:
            RoundClosed: the leader stored a newer global first; nothing was changed.
            SlotTaken: another worker counted one of these slots or ids first; nothing changed.
            StorageError: the database could not be written; nothing was changed.
        """
        rows = [(u.update_id, state.round, u.slot, u.num_samples, u.weight, u.staleness,
                 None if kept is None else _blob(kept)) for u, kept in updates]
        with self.transaction():
            latest = self.latest_round()
            if latest != state.round:
                raise RoundClosed(f"round {state.round} closed (the state is at {latest})")
            try:
                self.db.executemany("INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError as exc:
                raise SlotTaken(str(exc)) from exc
            # `count` adds up here: a restarted worker's `reported` holds only its new slots.
            self.db.execute(
                "INSERT INTO partials VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round, worker) "
                "DO UPDATE SET snapshot = excluded.snapshot, weight = excluded.weight, "
                "metric_sums = excluded.metric_sums, bytes = excluded.bytes, "
                "count = count + excluded.count",
                (state.round, worker, _blob(snapshot) if snapshot else None, state.weight,
                 json.dumps(state.metric_sums), state.bytes, len(rows)))
            self.record_rejections(worker, rejections)  # joins this transaction

    def record_rejections(self, worker: str, rejections: dict[str, int]) -> None:
        """A worker's rejection counts (reason -> how many), for the leader's status page.

        Raises:
            StorageError: the database could not be written.
        """
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO worker_rejections VALUES (?, ?)",
                            (worker, json.dumps(rejections)))

    def partial(self, round_number: int, worker: str) -> tuple[OpenRound, TensorDict] | None:
        """One worker's totals and partial-sum snapshot of `round_number`, if it stored any
        (`reported` stays empty: which slots reported is the accepted table's, for all)."""
        found = self._partials(round_number, "AND worker = ?", (worker,))
        return found[0] if found else None

    def partials(self, round_number: int) -> list[tuple[OpenRound, TensorDict]]:
        """Every worker's totals and snapshot of `round_number` (for the leader's merge)."""
        return self._partials(round_number, "ORDER BY worker")

    def _partials(self, round_number: int, rest: str, parameters: tuple[object, ...] = ()
                  ) -> list[tuple[OpenRound, TensorDict]]:
        rows = self.db.execute("SELECT snapshot, weight, metric_sums, bytes FROM partials "
                               f"WHERE round = ? {rest}", (round_number, *parameters))
        return [(OpenRound(round_number, float(weight), json.loads(sums), int(nbytes)),
                 {} if snapshot is None else load_tensors(snapshot))
                for snapshot, weight, sums, nbytes in rows]

    def reported(self, round_number: int) -> dict[str, str]:
        """Slot -> update id of every update counted in `round_number`, by any worker."""
        return dict(self.db.execute("SELECT device_id, update_id FROM accepted WHERE round = ? "
                                    "ORDER BY rowid", (round_number,)).fetchall())

    def worker_rejections(self) -> dict[str, dict[str, int]]:
        """Worker -> its rejection counts (reason -> how many), as it last committed them."""
        return {w: json.loads(c) for w, c in self.db.execute(
            "SELECT worker, counts FROM worker_rejections ORDER BY worker")}

    # -- a gateway under an upstream aggregator (aggregator.tiers) --------------------------
    def seal(self, round_number: int) -> None:
        """Record that `round_number` takes no more updates: its partial sum went upstream.

        Raises:
            StorageError: the database could not be written.
        """
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO sealed VALUES (?)", (round_number,))

    def is_sealed(self, round_number: int) -> bool:
        """Whether `round_number` was sealed."""
        return self.db.execute("SELECT 1 FROM sealed WHERE round = ?",
                               (round_number,)).fetchone() is not None

    def transaction(self) -> _Transaction:
        """One write transaction around several calls (calls inside it join it)."""
        return _Transaction(self.db)


def _blob(tensors: TensorDict) -> bytes:
    """Tensors as one safetensors blob (which wants C-contiguous arrays)."""
    return save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error; write failures become StorageError."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.nested = False

    def __enter__(self) -> None:
        if self.db.in_transaction:  # inside an outer transaction: that one commits
            self.nested = True
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write the state database: {exc}") from exc

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        if self.nested:
            return False
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as failure:
            if self.db.in_transaction:  # a failed COMMIT leaves the transaction open
                self.db.execute("ROLLBACK")
            raise StorageError(f"cannot write the state database: {failure}") from failure
        if isinstance(exc, sqlite3.Error | OSError):
            raise StorageError(f"cannot write the state database: {exc}") from exc
        return False
