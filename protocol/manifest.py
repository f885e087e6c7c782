"""Export manifest: what a training program expects (adapter names, shapes, dtypes, inputs)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.tensors import TensorDict, is_personal

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One trainable adapter tensor: canonical name, name inside the exported programs, shape."""

    name: str
    native_name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a device or the aggregator must agree on about one exported model."""

    workload: str
    base_sha256: str
    batch_size: int
    input_shape: tuple[int, ...]  # one batch of inputs, batch dimension included
    input_dtype: str
    labels: tuple[str, ...]
    lora: dict[str, Any]
    tensors: tuple[TensorSpec, ...]
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to the manifest

    @property
    def sha256(self) -> str:
        """Hash of the manifest's canonical JSON; updates carry it to prove they match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def spec(self, name: str) -> TensorSpec:
        """Return the spec of one canonical tensor name."""
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def check_adapter(self, tensors: TensorDict, shared_only: bool = False) -> None:
        """Raise ValueError if the tensors do not match the manifest's names, shapes and dtypes.

        With `shared_only`, the expected names are those that travel (no personal tensors).
        """
        expected = {s.name for s in self.tensors if not (shared_only and is_personal(s.name))}
        got = set(tensors)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"adapter tensor names differ: missing {missing}, unexpected {extra}")
        for spec in self.tensors:
            if spec.name not in expected:
                continue
            array = tensors[spec.name]
            if tuple(array.shape) != spec.shape:
                raise ValueError(f"tensor {spec.name!r} has shape {array.shape}, expected {spec.shape}")
            if array.dtype != np.dtype(spec.dtype):
                raise ValueError(f"tensor {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) so the hash is stable."""
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest written by to_json."""
        raw = json.loads(text)
        raw["tensors"] = tuple(
            TensorSpec(t["name"], t["native_name"], tuple(t["shape"]), t["dtype"])
            for t in raw["tensors"]
        )
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["labels"] = tuple(raw["labels"])
        return cls(**raw)


def load_manifest(artifact_dir: Path) -> Manifest:
    """Read manifest.json from an artifact folder."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {artifact_dir}: run `edgefl export` first")
    return Manifest.from_json(path.read_text())
