"""Durable aggregator state in SQLite (WAL): globals, the open round's running sum, accepted ids.

Each accepted update is committed in one transaction (its id, device and the new running sum)
before its MQTT delivery is acknowledged, so after a crash at any point the broker redelivers
exactly the updates that are not yet counted, and the id table drops any it sees again.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from aggregator.strategies import WeightedSum
from protocol.tensors import TensorDict

DB_FILE = "aggregator.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS globals (
    round INTEGER PRIMARY KEY, adapter BLOB NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS open_round (
    id INTEGER PRIMARY KEY CHECK (id = 0), round INTEGER NOT NULL, sums BLOB, weight REAL,
    count INTEGER, metric_sums TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accepted (
    update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, device_id TEXT NOT NULL, -- or slot
    num_samples INTEGER NOT NULL, weight REAL NOT NULL, adapter BLOB);
"""


@dataclass
class OpenRound:
    """The round being collected: its running weighted sum and who has reported."""

    round: int
    sums: WeightedSum | None = None
    metric_sums: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    reported: dict[str, str] = field(default_factory=dict)  # device id -> update id
    # Strategies that need every update (median, trimmed mean, DP) keep them, not a sum.
    buffer: list[tuple[TensorDict, float]] = field(default_factory=list)


class GlobalStore:
    """SQLite file `aggregator.sqlite` in `folder`; one writer (the coordinator)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / DB_FILE, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed update survives power loss
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # -- globals ---------------------------------------------------------------------------
    def save(self, round_number: int, adapter: TensorDict, info: dict[str, object]) -> None:
        """Persist the global adapter that opens `round_number` and start that round empty."""
        with self._transaction():
            self._save_global(round_number, adapter, info)

    def _save_global(self, round_number: int, adapter: TensorDict,
                     info: dict[str, object]) -> None:
        self.db.execute("INSERT OR REPLACE INTO globals VALUES (?, ?, ?)",
                        (round_number, save_tensors(adapter), json.dumps(info)))
        self.db.execute("INSERT OR REPLACE INTO open_round VALUES (0, ?, NULL, 0, 0, '{}', 0)",
                        (round_number,))

    def latest(self) -> tuple[int, TensorDict, dict[str, object]] | None:
        """(round, adapter, info) of the newest global, or None for a fresh store."""
        row = self.db.execute(
            "SELECT round, adapter, info FROM globals ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return int(row[0]), load_tensors(row[1]), json.loads(row[2])

    def global_at(self, round_number: int) -> TensorDict | None:
        """The global adapter that opened `round_number`, if stored."""
        row = self.db.execute("SELECT adapter FROM globals WHERE round = ?",
                              (round_number,)).fetchone()
        return None if row is None else load_tensors(row[0])

    def history(self) -> list[int]:
        """Rounds whose global adapter is stored."""
        return [r for (r,) in self.db.execute("SELECT round FROM globals ORDER BY round")]

    # -- the open round --------------------------------------------------------------------
    def open_round(self) -> OpenRound | None:
        """The round being collected, with everything accepted so far."""
        row = self.db.execute("SELECT round, sums, weight, count, metric_sums, bytes "
                              "FROM open_round WHERE id = 0").fetchone()
        if row is None:
            return None
        round_number, sums, weight, count, metric_sums, nbytes = row
        acc = None if sums is None else WeightedSum(load_tensors(sums), float(weight), int(count))
        rows = self.db.execute(
            "SELECT device_id, update_id, weight, adapter FROM accepted WHERE round = ? "
            "ORDER BY rowid", (round_number,)).fetchall()
        reported = {device: update for device, update, _, _ in rows}
        buffer = [(load_tensors(blob), float(w)) for _, _, w, blob in rows if blob is not None]
        return OpenRound(int(round_number), acc, json.loads(metric_sums), int(nbytes), reported,
                         buffer)

    def accept(self, update_id: str, device_id: str, num_samples: int, weight: float,
               state: OpenRound, adapter: TensorDict | None = None) -> None:
        """Atomically record one accepted update and the round's new running sum.

        `adapter` is stored only for strategies that aggregate the whole round at once.
        """
        sums = None if state.sums is None else save_tensors(
            {k: np.ascontiguousarray(v) for k, v in state.sums.sums.items()})
        blob = None if adapter is None else save_tensors(adapter)
        with self._transaction():
            self.db.execute("INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?)",
                            (update_id, state.round, device_id, num_samples, weight, blob))
            self.db.execute(
                "UPDATE open_round SET sums = ?, weight = ?, count = ?, metric_sums = ?, "
                "bytes = ? WHERE id = 0",
                (sums, None if state.sums is None else state.sums.weight,
                 None if state.sums is None else state.sums.count,
                 json.dumps(state.metric_sums), state.bytes),
            )

    def accepted_adapters(self, round_number: int) -> list[tuple[TensorDict, float]]:
        """(adapter, weight) of the updates kept for `round_number` (non-streaming strategies)."""
        rows = self.db.execute("SELECT adapter, weight FROM accepted WHERE round = ? AND "
                               "adapter IS NOT NULL ORDER BY rowid", (round_number,))
        return [(load_tensors(blob), float(weight)) for blob, weight in rows]

    def accepted_by_slot(self, round_number: int) -> dict[str, tuple[TensorDict, float]]:
        """Slot (device id, or device/task for FL-TAC) -> (adapter, weight) of kept updates."""
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

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
