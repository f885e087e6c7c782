"""Keep the runtimes' native prints (ExecuTorch's cpuinfo lines, ONNX Runtime's graph warnings)
off a quiet terminal.

Both are C++ writing to file descriptor 2 or their own loggers, which Python's logging and
warnings filters never see. The switch is an environment variable so that the fleet's worker
processes (spawned, not forked) inherit it; `edgefl` sets it unless run with -v.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = "EDGEFL_QUIET_NATIVE"
# ONNX Runtime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
ORT_ERRORS_ONLY = 3


def set_quiet(quiet: bool) -> None:
    """Silence (or not) native prints in this process and the processes it starts."""
    os.environ[QUIET_ENV] = "1" if quiet else "0"


def is_quiet() -> bool:
    """Whether native prints are to be silenced."""
    return os.environ.get(QUIET_ENV) == "1"


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """When quiet, point fd 2 at /dev/null for the block (a C++ fprintf bypasses sys.stderr).

    Keep the block short: whatever any thread writes to stderr meanwhile is lost, so it wraps
    only calls known to print (ExecuTorch's first program run reads the CPU topology; ONNX
    Runtime's training-artifact generation logs its graph passes), with no other thread busy.
    """
    if not is_quiet():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
