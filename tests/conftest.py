"""Shared fixtures: a real Mosquitto on a free loopback port, exported CNN artifacts, factories."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protocol.tensors import TensorDict
from transport.broker import Broker


@pytest.fixture(autouse=True)
def _quiet_libraries() -> None:
    for name in ("amqtt", "transitions", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture()
def mosquitto() -> Iterator[Broker]:
    """A fresh Mosquitto broker for one test (real process, free port on 127.0.0.1)."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    with Broker(prefer="mosquitto") as broker:
        assert broker.kind == "mosquitto"
        yield broker


@pytest.fixture(scope="session")
def cnn_artifacts() -> Path:
    """The Fashion-MNIST CNN exported for ExecuTorch and ONNX Runtime (cached by input hash)."""
    from export.build import build_artifacts

    return build_artifacts("fmnist-cnn")


def make_adapter(seed: int, shapes: dict[str, tuple[int, ...]]) -> TensorDict:
    """A reproducible random adapter with the given tensor shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
