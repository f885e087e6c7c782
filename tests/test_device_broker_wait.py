"""A device or an aggregator started before its broker waits for it, with one log line."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, RoundRecord
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from transport import TransportError
from transport.broker import Broker, free_port
from transport.mqtt import MqttTransport

FED = "wait"
HOST = "127.0.0.1"


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "transport.mqtt" and text in r.getMessage()]


def test_device_and_aggregator_started_before_the_broker_wait_for_it(
    cnn_artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: both sides start on a port where no broker listens yet
    caplog.set_level(logging.WARNING, logger="transport.mqtt")
    port = free_port()
    manifest = load_manifest(cnn_artifacts)
    agg = MqttTransport(HOST, port, "agg", persistent_session=True, manual_ack=True)
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=1, min_clients=1,
                              round_deadline_s=120, train=TrainConfig(local_steps=3))
    coordinator = Coordinator(config, manifest,
                              load_file(str(cnn_artifacts / manifest.files["adapter_init"])),
                              agg, GlobalStore(tmp_path / "agg"))
    records: list[RoundRecord] = []

    def serve() -> None:
        agg.start()
        records.extend(coordinator.run())

    private, parts = device_partitions(1, alpha=1.0, seed=3)
    data = private.subset(parts[0])
    device = DeviceAgent("dev0", FED, make_trainer("onnxruntime", cnn_artifacts), data.x, data.y,
                         MqttTransport(HOST, port, "dev0", will=DeviceAgent.will(FED, "dev0")),
                         tmp_path / "dev")
    threads = [threading.Thread(target=serve, daemon=True),
               threading.Thread(target=device.run, daemon=True)]
    for thread in threads:
        thread.start()

    # Execute: the broker comes up 2 s later
    time.sleep(2)
    with Broker(port=port, prefer="mosquitto"):
        for thread in threads:
            thread.join(60)
        agg.stop()

    # Assert: the round ran; each side said once that it waited and once that it connected
    assert [r.devices for r in records] == [("dev0",)]
    assert device.rounds_trained == 1
    waiting = sorted(_lines(caplog, "waiting for the broker"))
    assert [line.split(": ")[:2] for line in waiting] == [
        [client, f"waiting for the broker at {HOST}:{port}"] for client in ("agg", "dev0")]
    assert all("refused" in line for line in waiting)  # the reason, from the OS
    assert sorted(_lines(caplog, "connected to the broker")) == [
        f"{client}: connected to the broker at {HOST}:{port}" for client in ("agg", "dev0")]


def test_start_gives_up_after_connect_timeout() -> None:
    transport = MqttTransport(HOST, free_port(), "impatient")
    started = time.monotonic()
    with pytest.raises(TransportError, match="no broker at"):
        transport.start(connect_timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_stop_ends_a_wait_for_the_broker() -> None:
    transport = MqttTransport(HOST, free_port(), "stopped")
    errors: list[Exception] = []

    def start() -> None:
        try:
            transport.start()
        except TransportError as exc:
            errors.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    time.sleep(0.5)
    transport.stop()
    thread.join(5)
    assert not thread.is_alive() and len(errors) == 1
