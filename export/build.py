"""Build (or reuse from the cache) every artifact of one workload, with its manifest.

The manifest records the ExecuTorch program's frozen inputs (LoRA layer deltas, logit bias), so a
device knows what to pass after (inputs, labels).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path

from safetensors.numpy import save_file

from protocol.manifest import MANIFEST_FILE, FrozenInput, Manifest, TensorSpec
from protocol.tensors import canonical_key
from workloads.base import REPO_ROOT, Workload, cache_root, file_sha256
from workloads.lora import get_adapter
from workloads.registry import get_workload

logger = logging.getLogger(__name__)

PTE_FILE = "model.pte"
ORT_DIR = "ort"
ADAPTER_INIT_FILE = "adapter_init.safetensors"
TOOLCHAIN = ("torch", "executorch", "onnxruntime-training", "onnx", "peft", "transformers")
# Source files whose edits change what is exported: they are part of the cache key.
_SOURCES = ("export", "workloads", "protocol/manifest.py", "protocol/tensors.py")


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in TOOLCHAIN}


def _source_files() -> list[Path]:
    files: list[Path] = []
    for entry in _SOURCES:
        path = REPO_ROOT / entry
        files.extend(sorted(path.glob("*.py")) if path.is_dir() else [path])
    return files


def artifact_key(workload: Workload, batch_size: int, base_sha256: str, seed: int) -> str:
    """Hash of everything an export depends on: inputs, code and toolchain."""
    payload = json.dumps(
        {"workload": workload.name, "batch": batch_size, "base": base_sha256, "seed": seed,
         "code": file_sha256(*_source_files()), "versions": _versions()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_artifacts(
    workload_name: str, batch_size: int | None = None, seed: int = 0,
    out_root: Path | None = None, backends: tuple[str, ...] = ("executorch", "onnxruntime"),
) -> Path:
    """Export `workload_name` for the given backends; return the artifact folder.

    The folder name carries a hash of the inputs, so an unchanged export is reused instantly and
    a changed one never overwrites a folder a device may still be using. Building happens in a
    temporary folder that is renamed into place at the end: a crash leaves no half-built entry.
    """
    workload = get_workload(workload_name)
    batch = batch_size or workload.batch_size
    base = workload.base_weights()
    base_sha256 = file_sha256(base)
    key = artifact_key(workload, batch, base_sha256, seed)
    root = out_root or cache_root() / "artifacts"
    final = root / f"{workload.name}-b{batch}-{key}"
    if (final / MANIFEST_FILE).exists():
        logger.info("artifacts up to date: %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, devices) may ask for the same export at once: one
    # builds while the others wait on the lock, then find the finished folder.
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST_FILE).exists():
            return final
        _build_into(final, workload, batch, base_sha256, seed, backends)
    return final


def _build_into(final: Path, workload: Workload, batch: int, base_sha256: str, seed: int,
                backends: tuple[str, ...]) -> None:
    base = workload.base_weights()
    tmp = final.parent / f".{final.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    model = workload.build(base, seed=seed)
    example = workload.example_batch(batch)
    files = {"adapter_init": ADAPTER_INIT_FILE}
    save_file(get_adapter(model), str(tmp / ADAPTER_INIT_FILE))
    frozen: tuple[FrozenInput, ...] = ()
    if "executorch" in backends:
        from export.executorch_export import export_pte

        started = time.monotonic()
        frozen = export_pte(model, example, tmp / PTE_FILE)
        logger.info("ExecuTorch program written in %.1fs", time.monotonic() - started)
        files["executorch"] = PTE_FILE
    if "onnxruntime" in backends:
        from export.onnx_export import export_ort

        started = time.monotonic()
        export_ort(model, example, tmp / ORT_DIR)
        logger.info("ONNX Runtime artifacts written in %.1fs", time.monotonic() - started)
        files["onnxruntime"] = ORT_DIR

    inputs = example[0]
    manifest = Manifest(
        workload=workload.name,
        base_sha256=base_sha256,
        batch_size=batch,
        input_shape=tuple(inputs.shape),
        input_dtype=str(inputs.dtype).removeprefix("torch."),
        labels=tuple(workload.labels),
        lora=workload.lora_summary() | {"seed": seed},
        tensors=tuple(
            TensorSpec(canonical_key(name), name, tuple(p.shape), "float32")
            for name, p in model.named_parameters() if p.requires_grad
        ),
        versions=_versions(),
        files=files,
        frozen_inputs=frozen,
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    logger.info("artifacts ready: %s (manifest %s)", final, manifest.sha256[:12])
