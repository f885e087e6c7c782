"""Devices survive crashes and broker outages (unsent updates are kept on disk and delivered),
and say on their retained status when they cannot take part."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from transport.broker import Broker
from transport.mqtt import MqttTransport

FED = "offline"


def _agent(broker: Broker, artifacts: Path, state: Path, index: int) -> DeviceAgent:
    private, parts = device_partitions(2, alpha=1.0, seed=3)
    data = private.subset(parts[index])
    device_id = f"dev{index}"
    transport = MqttTransport(broker.host, broker.port, device_id,
                              will=DeviceAgent.will(FED, device_id))
    return DeviceAgent(device_id, FED, make_trainer("onnxruntime", artifacts), data.x, data.y,
                       transport, state, seed=index)


def _coordinator(broker: Broker, artifacts: Path, state: Path, rounds: int,
                 clients: int) -> tuple[Coordinator, MqttTransport]:
    manifest = load_manifest(artifacts)
    transport = MqttTransport(broker.host, broker.port, "agg", persistent_session=True,
                              manual_ack=True)
    transport.start()
    config = AggregatorConfig(federation=FED, rounds=rounds, clients_per_round=clients,
                              min_clients=clients, round_deadline_s=300, republish_s=1.0,
                              train=TrainConfig(local_steps=3))
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    return Coordinator(config, manifest, initial, transport, GlobalStore(state)), transport


def test_update_left_on_disk_is_sent_after_a_crash_while_its_round_is_open(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: dev0 trained round 0 and "crashed" before sending (its update is on disk only)
    crashed = _agent(mosquitto, cnn_artifacts, tmp_path / "dev", 0)
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    [update] = crashed.handle_global(GlobalModel(FED, 0, manifest.sha256, initial,
                                                 TrainConfig(local_steps=3)))
    crashed._save_pending(0, [codec.encode_update(update)])
    crashed.state.last_round = 0
    crashed.state.save(crashed.state_path)
    coordinator, agg = _coordinator(mosquitto, cnn_artifacts, tmp_path / "agg", rounds=1,
                                    clients=1)
    # Execute: the device restarts; it must not retrain round 0, only deliver the saved update
    restarted = _agent(mosquitto, cnn_artifacts, tmp_path / "dev", 0)
    assert restarted.pending is not None and restarted.pending[0] == 0
    thread = threading.Thread(target=restarted.run, daemon=True)
    thread.start()
    records = coordinator.run()
    thread.join(20)
    agg.stop()
    # Assert
    assert records[0].devices == ("dev0",)
    assert restarted.rounds_trained == 0
    assert restarted.pending is None and not restarted.pending_path.exists()
    assert coordinator.store.is_accepted(update.update_id)


def test_update_of_a_closed_round_is_dropped(mosquitto: Broker, cnn_artifacts: Path,
                                             tmp_path: Path) -> None:
    agent = _agent(mosquitto, cnn_artifacts, tmp_path, 0)
    agent._save_pending(2, [b"old bytes"])
    agent.note_round(1)  # an older global (say, an old retained copy) closes nothing
    assert agent.pending is not None and agent.pending_path.exists()
    agent.note_round(3)
    assert agent.pending is None and not agent.pending_path.exists()


def test_round_completes_across_a_broker_restart(cnn_artifacts: Path, tmp_path: Path) -> None:
    # Prepare: a broker that will be stopped and started again on the same port. Like a
    # gateway's broker it persists sessions, so the aggregator's subscription and the updates
    # queued for it survive; the retained global is re-sent by the aggregator regardless.
    broker = Broker(prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
    port = broker.port
    coordinator, agg = _coordinator(broker, cnn_artifacts, tmp_path / "agg", rounds=2, clients=2)
    agents = [_agent(broker, cnn_artifacts, tmp_path / "dev", i) for i in range(2)]
    first_round_done = threading.Event()
    coordinator.on_round = lambda record, adapter: first_round_done.set()
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    result: list = []
    runner = threading.Thread(target=lambda: result.extend(coordinator.run()), daemon=True)
    runner.start()
    # Execute: take the broker away right after round 0 closes, then bring it back
    assert first_round_done.wait(60)
    broker.stop()
    time.sleep(2)
    broker = Broker(port=port, prefer="mosquitto", persistence_dir=tmp_path / "broker-db")
    try:
        runner.join(90)
        for thread in threads:
            thread.join(30)
    finally:
        agg.stop()
        broker.stop()
    # Assert: both rounds closed with both devices, and the devices finished
    if runner.is_alive():
        pytest.fail("the federation did not finish after the broker came back")
    assert [r.devices for r in result] == [("dev0", "dev1"), ("dev0", "dev1")]
    assert [a.rounds_trained for a in agents] == [2, 2]


def test_device_with_other_artifacts_says_so_once_on_its_status(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a device, a watcher of its retained status, and a stand-in gateway's globals
    caplog.set_level(logging.INFO, logger="edge_client.agent")
    agent = _agent(mosquitto, cnn_artifacts, tmp_path, 0)
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "watcher")
    watcher.start()
    watcher.subscribe(topics.status_filter(FED))
    gateway = MqttTransport(mosquitto.host, mosquitto.port, "gateway")
    gateway.start()
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))

    def publish(round_number: int, sha256: str, final: bool = False) -> None:
        message = GlobalModel(FED, round_number, sha256, initial, TrainConfig(local_steps=3),
                              final=final)
        gateway.publish(topics.global_topic(FED), codec.encode_global(message), retain=True)

    def next_status() -> tuple[bool, str | None]:
        message = watcher.receive(20)
        assert message is not None, "no status"
        status = codec.decode_status(message.payload)
        return status.online, status.problem

    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    assert next_status() == (True, None)
    # Execute: a global for another model version, republished twice, then ours, then the end
    publish(0, "0" * 64)
    assert next_status() == (True, "manifest")
    for _ in range(2):
        time.sleep(1.0)
        publish(0, "0" * 64)
    time.sleep(1.0)
    publish(0, manifest.sha256)
    assert next_status() == (True, None)
    publish(1, manifest.sha256, final=True)
    thread.join(30)
    # Assert: one problem status and one log line for three mismatched globals; then it trained
    assert next_status() == (False, None)
    assert watcher.receive(1) is None
    gateway.stop()
    watcher.stop()
    assert agent.rounds_trained == 1
    assert len([r for r in caplog.records if "another model version" in r.getMessage()]) == 1
