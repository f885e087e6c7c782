"""Shared fixtures: a real Mosquitto on a free loopback port, exported CNN artifacts, factories."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.coordinator import Coordinator, RoundRecord
from edge_client.agent import DeviceAgent
from protocol.tensors import TensorDict
from transport.broker import Broker
from transport.mqtt import MqttTransport


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


@pytest.fixture(scope="session")
def legacy_cnn_artifacts(cnn_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CNN artifacts as exported before programs took frozen inputs: the ExecuTorch program
    compiles every frozen weight in and the manifest lists no frozen_inputs."""
    from dataclasses import replace

    from export.executorch_export import export_pte
    from protocol.manifest import MANIFEST_FILE, load_manifest
    from workloads.registry import get_workload

    folder = tmp_path_factory.mktemp("legacy") / cnn_artifacts.name
    shutil.copytree(cnn_artifacts, folder)
    manifest = load_manifest(folder)
    workload = get_workload(manifest.workload)
    model = workload.build(workload.base_weights(), seed=int(manifest.lora["seed"]))
    export_pte(model, workload.example_batch(manifest.batch_size),
               folder / manifest.files["executorch"], with_frozen_inputs=False)
    (folder / MANIFEST_FILE).write_text(replace(manifest, frozen_inputs=()).to_json())
    return folder


def run_rounds(coordinator: Coordinator, agents: list[DeviceAgent],
               aggregator_transport: MqttTransport) -> list[RoundRecord]:
    """Run the devices on threads and the coordinator here until its last round; then tidy up."""
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        return coordinator.run()
    finally:
        for thread in threads:
            thread.join(30)
        aggregator_transport.stop()


def retained_statuses(broker: Broker, federation: str) -> dict[str, bool]:
    """Device id -> online, as the broker's retained status messages of `federation` say."""
    from protocol import topics
    from protocol.codec import decode_status

    observer = MqttTransport(broker.host, broker.port, "observer")
    observer.start()
    observer.subscribe(topics.status_filter(federation))
    statuses = {s.device_id: s.online for s in (
        decode_status(m.payload) for m in iter(lambda: observer.receive(2), None))}
    observer.stop()
    return statuses


def wait_for_round(coordinator: Coordinator, round_number: int, timeout_s: float) -> int:
    """Wait until the running coordinator has opened `round_number` (or the timeout passed);
    return the round it is at."""
    import time

    deadline = time.monotonic() + timeout_s
    while coordinator.round < round_number and time.monotonic() < deadline:
        time.sleep(0.05)
    return coordinator.round


def make_adapter(seed: int, shapes: dict[str, tuple[int, ...]]) -> TensorDict:
    """A reproducible random adapter with the given tensor shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="session")
def native_build() -> Path:
    """edge_client/native built (incrementally) into .cache/native by scripts/build_native.sh,
    and the native ingest worker (aggregator/native) into .cache/native-ingest."""
    from edge_client.native import build_native

    return build_native()
