"""Export manifest: what a training program expects (adapter names, shapes, dtypes, inputs).

Besides the adapter, a manifest lists the program's *frozen inputs*: frozen-weight overrides that
the ExecuTorch program takes as inputs after (inputs, labels), in that order, because it compiles
frozen weights in as constants (ONNX Runtime and torch change them in place instead).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.tensors import TensorDict, is_personal

MANIFEST_FILE = "manifest.json"
# Kinds of frozen input (FrozenInput.kind).
BASE_DELTA = "base_delta"  # added to a LoRA layer's frozen weight: W0 + delta (exact aggregation)
LOGIT_BIAS = "logit_bias"  # the frozen additive logit bias (class masks), replaced as a whole
FROZEN_INPUT_KINDS = (BASE_DELTA, LOGIT_BIAS)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One trainable adapter tensor: canonical name, name inside the exported programs, shape."""

    name: str
    native_name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True, slots=True)
class FrozenInput:
    """One frozen-weight override a training program takes as an input (zeros: no override).

    kind BASE_DELTA: `name` is a LoRA layer's path ("fc1"), `shape` its frozen weight's
    (d_out, d_in). kind LOGIT_BIAS: `name` is "logit_bias", `shape` is (num_classes,).
    """

    name: str
    kind: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in FROZEN_INPUT_KINDS:
            raise ValueError(
                f"unknown frozen input kind {self.kind!r}; one of {FROZEN_INPUT_KINDS}")


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
    # The ExecuTorch program's inputs after (inputs, labels), in order; () for exports made
    # before programs took frozen inputs (their devices cannot change frozen weights).
    frozen_inputs: tuple[FrozenInput, ...] = ()

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

    def lora_scaling(self, layer: str) -> float:
        """The LoRA scaling of one layer (canonical prefix, "fc1"): α/r, as peft computes it.

        Per-layer overrides in `lora["rank_pattern"]` / `lora["alpha_pattern"]` (peft's dicts,
        keyed by a module name or a suffix of it, regular expressions allowed) are matched as
        peft matches them: the first key K with `layer` matching `(.*\\.)?(K)$`. With
        `lora["use_rslora"]` the scaling is α/√r, as in peft.

        Raises:
            ValueError: `lora` lacks r or alpha, or the layer's r is not positive.
        """
        if "r" not in self.lora or "alpha" not in self.lora:
            raise ValueError(f"the manifest's lora settings lack r or alpha: {self.lora}")

        def lookup(pattern_name: str, default: Any) -> Any:  # peft's get_pattern_key
            for key, value in (self.lora.get(pattern_name) or {}).items():
                if re.match(rf"(.*\.)?({key})$", layer):
                    return value
            return default

        rank = lookup("rank_pattern", self.lora["r"])
        alpha = lookup("alpha_pattern", self.lora["alpha"])
        if not float(rank) > 0:
            raise ValueError(f"LoRA rank of layer {layer!r} must be positive, got {rank}")
        if self.lora.get("use_rslora"):
            return float(alpha) / math.sqrt(float(rank))
        return float(alpha) / float(rank)

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
        raw = asdict(self)
        if not raw["frozen_inputs"]:
            # Left out when empty, so a manifest written before the field existed keeps its hash.
            del raw["frozen_inputs"]
        return json.dumps(raw, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest written by to_json."""
        raw = json.loads(text)
        raw["tensors"] = tuple(
            TensorSpec(t["name"], t["native_name"], tuple(t["shape"]), t["dtype"])
            for t in raw["tensors"]
        )
        raw["frozen_inputs"] = tuple(
            FrozenInput(f["name"], f["kind"], tuple(f["shape"]))
            for f in raw.get("frozen_inputs", ())
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
