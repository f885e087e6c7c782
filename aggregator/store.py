"""Durable aggregator state: every global adapter it published, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.numpy import load_file, save_file

from protocol.tensors import TensorDict


class GlobalStore:
    """`round-NNNNN.safetensors` per published global plus `state.json` naming the latest.

    Writes go to a temporary file, are fsynced, then renamed: after a crash the folder holds
    either the old or the new state, never a torn file.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, round_number: int, adapter: TensorDict, info: dict[str, object]) -> None:
        """Persist the global adapter that opens `round_number`, then mark it the latest."""
        path = self.folder / f"round-{round_number:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(adapter, str(tmp), metadata={"round": str(round_number)})
        _fsync_replace(tmp, path)
        state = self.folder / "state.json"
        tmp_state = state.with_suffix(".tmp")
        tmp_state.write_text(json.dumps({"round": round_number, **info}, indent=1))
        _fsync_replace(tmp_state, state)

    def latest(self) -> tuple[int, TensorDict, dict[str, object]] | None:
        """(round, adapter, info) of the last saved global, or None for a fresh folder."""
        state = self.folder / "state.json"
        if not state.exists():
            return None
        info = json.loads(state.read_text())
        round_number = int(info.pop("round"))
        adapter = load_file(str(self.folder / f"round-{round_number:05d}.safetensors"))
        return round_number, adapter, info

    def history(self) -> list[int]:
        """Rounds whose global adapter is on disk."""
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.safetensors"))


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(final)
