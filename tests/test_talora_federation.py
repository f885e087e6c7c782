"""Fed-TaLoRA over MQTT: one task-agnostic adapter through a class-incremental task schedule."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from edge_client.agent import DeviceAgent
from edge_client.data import device_partitions
from edge_client.trainer import make_trainer
from aggregator.rounds import GlobalState
from protocol.codec import decode_global
from protocol.residual import dense_residual
from protocol import topics
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from transport.broker import Broker
from tests.conftest import run_rounds
from transport.mqtt import MqttTransport
from workloads import fmnist

FED = "talora"
SCHEDULE = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def test_fed_talora_trains_one_adapter_through_the_task_sequence(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: a torch and an ONNX Runtime device holding all classes; the schedule decides
    # which of them they train on, one task per round.
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    private, parts = device_partitions(2, alpha=5.0, seed=4)
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    watcher = MqttTransport(mosquitto.host, mosquitto.port, "watcher")
    watcher.start()
    watcher.subscribe(topics.global_topic(FED))
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=len(SCHEDULE), clients_per_round=2,
                              min_clients=2, strategy="fed-talora", task_schedule=SCHEDULE,
                              rounds_per_task=1, train=TrainConfig(local_steps=15))
    coordinator = Coordinator(config, manifest, initial, agg, store)
    agents = []
    for i, backend in enumerate(("torch", "onnxruntime")):
        data = private.subset(parts[i])
        transport = MqttTransport(mosquitto.host, mosquitto.port, f"{backend}-{uuid.uuid4().hex[:4]}",
                                  will=DeviceAgent.will(FED, backend))
        agents.append(DeviceAgent(backend, FED, make_trainer(backend, cnn_artifacts), data.x,
                                  data.y, transport, seed=i))

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: the globals announced the schedule, one task per round
    announced = {}
    while (message := watcher.receive(2)) is not None:
        decoded = decode_global(message.payload)
        announced[decoded.round] = (decoded.task_index, decoded.task_classes)
    watcher.stop()
    assert announced[len(SCHEDULE) - 1] == (4, (8, 9))  # retained + republished: the last two
    assert [len(r.devices) for r in records] == [2] * len(SCHEDULE)
    for round_number, classes in enumerate(SCHEDULE):
        start = GlobalState.from_tensors(round_number, store.global_at(round_number), {}).adapter
        others = np.setdiff1d(np.arange(10), classes)
        for adapter, _ in store.accepted_adapters(round_number):
            # No parameter growth: every update is the same adapter as the initial one
            assert {k: v.shape for k, v in adapter.items()} == \
                   {k: v.shape for k, v in initial.items()}
            # Masked logits: the head rows of classes outside the task did not move ...
            np.testing.assert_array_equal(adapter["head.weight"][others],
                                          start["head.weight"][others])
            # ... while the task's own rows did
            assert np.abs(adapter["head.weight"][list(classes)]
                          - start["head.weight"][list(classes)]).max() > 1e-4
    # Residual calibration: the final global carries the cumulative residual as factors
    last = GlobalState.from_tensors(len(SCHEDULE), store.global_at(len(SCHEDULE)), {})
    final, residual = last.adapter, dense_residual(last.residual)
    assert set(residual) == {"fc1", "fc2"}

    # The final model, with its residual, classifies all ten classes without a task id
    evaluator = make_trainer("onnxruntime", cnn_artifacts)
    evaluator.set_base_delta(residual)
    evaluator.set_adapter(final)
    test = fmnist.load("t10k").subset(np.arange(1024))
    predicted = np.concatenate([evaluator.logits(test.x[i : i + 32]).argmax(1)
                                for i in range(0, len(test), 32)])
    per_task = [float(np.mean(predicted[np.isin(test.y, c)] == test.y[np.isin(test.y, c)]))
                for c in SCHEDULE]
    assert np.mean(predicted == test.y) > 0.3, per_task
    assert sum(a > 0.2 for a in per_task) >= 3, per_task  # not only the last task survives


def test_devices_without_a_class_mask_refuse_a_continual_federation(
    legacy_cnn_artifacts: Path,
) -> None:
    # An ExecuTorch program exported before frozen inputs compiles the logit bias in.
    manifest = load_manifest(legacy_cnn_artifacts)
    initial = load_file(str(legacy_cnn_artifacts / manifest.files["adapter_init"]))
    data = fmnist.load("t10k").subset(np.arange(64))
    agent = DeviceAgent("et", FED, make_trainer("executorch", legacy_cnn_artifacts), data.x,
                        data.y, transport=None)  # type: ignore[arg-type]
    message = GlobalModel(FED, 0, manifest.sha256, initial, task_index=0, task_classes=(0, 1))
    assert agent.handle_global(message) == []


def test_an_executorch_device_trains_only_the_task_classes(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    data = fmnist.load("t10k").subset(np.arange(256))
    agent = DeviceAgent("et", FED, make_trainer("executorch", cnn_artifacts), data.x, data.y,
                        transport=None)  # type: ignore[arg-type]
    [update] = agent.handle_global(GlobalModel(FED, 0, manifest.sha256, initial, task_index=0,
                                               task_classes=(0, 1)))
    others = np.setdiff1d(np.arange(10), (0, 1))
    np.testing.assert_array_equal(update.adapter["head.weight"][others],
                                  initial["head.weight"][others])
    assert not update.is_delta
    moved = update.adapter["head.weight"][[0, 1]] - initial["head.weight"][[0, 1]]
    assert np.abs(moved).max() > 1e-4  # the task's own rows trained


def test_a_device_without_examples_of_the_task_sits_the_round_out(cnn_artifacts: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    data = fmnist.load("t10k")
    only_shoes = data.subset(np.flatnonzero(np.isin(data.y, (5, 7, 9)))[:64])
    agent = DeviceAgent("shoes", FED, make_trainer("torch", cnn_artifacts), only_shoes.x,
                        only_shoes.y, transport=None)  # type: ignore[arg-type]
    assert agent.handle_global(GlobalModel(FED, 0, manifest.sha256, initial,
                                           task_index=0, task_classes=(0, 1))) == []
    [update] = agent.handle_global(GlobalModel(FED, 1, manifest.sha256, initial,
                                               task_index=2, task_classes=(5, 7)))
    assert update.num_samples == int(np.isin(only_shoes.y, (5, 7)).sum())


def test_task_schedule_rounds() -> None:
    # (fed-talora without a schedule is refused by the registry: tests/test_round_aggregators.py)
    with pytest.raises(ValueError, match="class ids"):
        AggregatorConfig(strategy="exact", task_schedule=((0, 1), ()))
    assert AggregatorConfig(task_schedule=SCHEDULE, rounds_per_task=2).task_at(9) == (4, (8, 9))
    assert AggregatorConfig(task_schedule=SCHEDULE, rounds_per_task=2).task_at(3) == (1, (2, 3))
    assert AggregatorConfig().task_at(3) == (None, None)
