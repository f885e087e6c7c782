"""Python side of the native device: build it, call its C API (ctypes), write its data files."""

from __future__ import annotations

import ctypes
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edge_client.data import LocalTask

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / ".cache" / "native"
LIBRARY = BUILD_DIR / "libedgefl_device.so"
EXECUTABLE = BUILD_DIR / "edgefl-device"


class NativeError(OSError):
    """The native library failed to build, or a call into it failed (its one-line reason).

    An OSError, as a missing tool or file is: commands report it as one line.
    """


def build_native() -> Path:
    """Build (incrementally) edge_client/native with scripts/build_native.sh; the build folder."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_native.sh")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines[-1:] or [""]
        first = errors[0]
        raise NativeError(f"building the native device failed: {first.strip()} (run bash "
                          "scripts/build_native.sh for the whole log)")
    return BUILD_DIR


class Buffer(ctypes.Structure):
    """edgefl_buffer: bytes owned by the library."""

    _fields_ = [("data", ctypes.POINTER(ctypes.c_uint8)), ("size", ctypes.c_size_t)]


@cache
def library() -> ctypes.CDLL:
    """The built library, with argument types declared (build_native() first)."""
    lib = ctypes.CDLL(str(LIBRARY))
    lib.edgefl_last_error.restype = ctypes.c_char_p
    lib.edgefl_version.restype = ctypes.c_char_p
    lib.edgefl_buffer_free.argtypes = [ctypes.POINTER(Buffer)]
    lib.edgefl_trainer_create.restype = ctypes.c_void_p
    lib.edgefl_trainer_create.argtypes = [ctypes.c_char_p, ctypes.c_double]
    lib.edgefl_trainer_destroy.argtypes = [ctypes.c_void_p]
    lib.edgefl_trainer_set_adapter.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.edgefl_trainer_get_adapter.argtypes = [ctypes.c_void_p, ctypes.POINTER(Buffer)]
    lib.edgefl_trainer_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)]
    lib.edgefl_trainer_gradients.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                             ctypes.POINTER(Buffer)]
    lib.edgefl_trainer_set_class_mask.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_size_t]
    lib.edgefl_trainer_set_base_delta.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                  ctypes.c_size_t]
    lib.edgefl_trainer_train_partition.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_uint64,
        ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
    lib.edgefl_codec_describe.argtypes = [ctypes.c_char_p, ctypes.c_size_t,
                                          ctypes.POINTER(Buffer)]
    lib.edgefl_codec_encode_update.argtypes = [ctypes.c_char_p, ctypes.POINTER(Buffer)]
    lib.edgefl_codec_sign.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_size_t, ctypes.POINTER(Buffer)]
    for name in ("trainer_set_adapter", "trainer_get_adapter", "trainer_step",
                 "trainer_gradients", "trainer_set_class_mask", "trainer_set_base_delta",
                 "trainer_train_partition", "codec_describe",
                 "codec_encode_update", "codec_sign"):
        getattr(lib, f"edgefl_{name}").restype = ctypes.c_int
    return lib


def check(rc: int) -> None:
    """Raise NativeError with the library's reason when a call returned -1."""
    if rc != 0:
        raise NativeError(library().edgefl_last_error().decode(errors="replace"))


def take(buffer: Buffer) -> bytes:
    """Copy a library-owned buffer into Python bytes and free it."""
    try:
        return ctypes.string_at(buffer.data, buffer.size)
    finally:
        library().edgefl_buffer_free(ctypes.byref(buffer))


def write_partition(path: Path, tasks: Sequence[LocalTask]) -> Path:
    """A device's data as the native device reads it (docs/DEVICES.md).

    One task with an empty slot name: tensors `inputs` and `labels`; otherwise
    `<slot>/inputs` and `<slot>/labels` per task slot. Inputs keep their dtype (float32 images,
    int64 token ids); labels are int64.
    """
    if not tasks:
        raise ValueError("a partition needs at least one task")
    tensors: dict[str, np.ndarray] = {}
    for task in tasks:
        prefix = f"{task.name}/" if task.name else ""
        if not task.name and len(tasks) > 1:
            raise ValueError("several task slots need names")
        tensors[prefix + "inputs"] = np.ascontiguousarray(task.inputs)
        tensors[prefix + "labels"] = np.ascontiguousarray(task.labels, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "edgefl-partition-1"})
    return path
