"""The manifest describes the exported adapter and catches drift in names, shapes and dtypes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from export.build import ADAPTER_INIT_FILE, build_artifacts
from protocol.manifest import BASE_DELTA, LOGIT_BIAS, FrozenInput, Manifest, load_manifest
from protocol.tensors import canonical_key


def test_manifest_round_trips_and_hash_is_stable(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest and again.sha256 == manifest.sha256
    assert manifest.workload == "fmnist-cnn" and manifest.batch_size == 32
    assert {"executorch", "onnxruntime", "adapter_init"} <= set(manifest.files)
    assert manifest.versions["executorch"] == "1.5.1"


def test_initial_adapter_matches_manifest(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    adapter = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    manifest.check_adapter(adapter)
    assert {s.name for s in manifest.tensors} == {
        "fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight", "fc2.lora_B.weight",
        "head.weight", "head.bias"}
    assert not adapter["fc1.lora_B.weight"].any()  # LoRA B starts at zero: W = W0 at round 0


def test_manifest_lists_the_executorch_programs_frozen_inputs(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    # program order: the LoRA layers' deltas, then the logit bias
    assert manifest.frozen_inputs == (
        FrozenInput("fc1", BASE_DELTA, (128, 1568)), FrozenInput("fc2", BASE_DELTA, (64, 128)),
        FrozenInput(LOGIT_BIAS, LOGIT_BIAS, (10,)))
    with pytest.raises(ValueError, match="kind"):
        FrozenInput("fc1", "scale", (128, 1568))


def test_a_manifest_without_frozen_inputs_parses_and_keeps_its_hash(cnn_artifacts: Path) -> None:
    """Manifests written before the field existed: no frozen inputs, and the same JSON (hash)."""
    manifest = load_manifest(cnn_artifacts)
    raw = json.loads(manifest.to_json())
    del raw["frozen_inputs"]
    older = json.dumps(raw, sort_keys=True, indent=1)
    parsed = Manifest.from_json(older)
    assert parsed.frozen_inputs == ()
    assert parsed.to_json() == older
    assert parsed.sha256 == hashlib.sha256(older.encode()).hexdigest() != manifest.sha256


def test_check_adapter_names_the_problem(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    adapter = load_file(str(cnn_artifacts / ADAPTER_INIT_FILE))
    with pytest.raises(ValueError, match="missing"):
        manifest.check_adapter({k: v for k, v in adapter.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="dtype"):
        manifest.check_adapter(adapter | {"head.bias": adapter["head.bias"].astype(np.float64)})


def test_rebuild_is_served_from_the_cache(cnn_artifacts: Path) -> None:
    assert build_artifacts("fmnist-cnn") == cnn_artifacts


@pytest.mark.parametrize(("native", "canonical"), [
    ("m.base_model.model.fc1.lora_A.default.weight", "fc1.lora_A.weight"),
    ("base_model.model.head.modules_to_save.default.bias", "head.bias"),
    ("base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight",
     "encoder.layer.0.attention.self.query.lora_B.weight"),
])
def test_canonical_key(native: str, canonical: str) -> None:
    assert canonical_key(native) == canonical


def test_missing_manifest_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="edgefl export"):
        load_manifest(tmp_path)
