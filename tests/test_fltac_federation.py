"""FL-TAC over MQTT: multi-task devices, one update per task slot, k-means clusters on the gateway."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from aggregator.clustering import cluster_agreement
from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from aggregator.strategies import fedavg
from edge_client.agent import DeviceAgent
from edge_client.data import multitask_tasks
from edge_client.trainer import evaluate_dataset, make_trainer
from protocol.codec import split_global_tensors
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig, slot_key
from transport.broker import Broker
from tests.conftest import run_rounds
from transport.mqtt import MqttTransport
from workloads import fmnist

FED = "fltac"
DEVICES = 4
ROUNDS = 3


def test_fltac_groups_task_slots_by_task_and_each_cluster_serves_its_task(
    mosquitto: Broker, cnn_artifacts: Path, tmp_path: Path
) -> None:
    # Prepare: 4 devices (ExecuTorch and ONNX Runtime), each with a clothing-type task and a
    # garment-group task on disjoint images; slot names t0/t1 are shuffled per device, so
    # nothing but the adapters tells the gateway which slot serves which task.
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    store = GlobalStore(tmp_path / "agg")
    config = AggregatorConfig(federation=FED, rounds=ROUNDS, clients_per_round=2 * DEVICES,
                              min_clients=2 * DEVICES, strategy="fltac", num_clusters=2,
                              train=TrainConfig(local_steps=15))
    coordinator = Coordinator(config, manifest, initial, agg, store)
    agents, truth = [], {}
    for i in range(DEVICES):
        backend = ("executorch", "onnxruntime")[i % 2]
        device_id = f"dev{i}"
        tasks = multitask_tasks(fmnist.FashionMnistData(), i, DEVICES, alpha=5.0, seed=3,
                                slot_seed=i)
        truth |= {slot_key(device_id, t.name): kind for kind, t in tasks.items()}
        transport = MqttTransport(mosquitto.host, mosquitto.port, f"{device_id}-{uuid.uuid4().hex[:4]}",
                                  will=DeviceAgent.will(FED, device_id))
        agents.append(DeviceAgent(device_id, FED, make_trainer(backend, cnn_artifacts), None,
                                  None, transport, tmp_path / "devices", seed=i,
                                  tasks=list(tasks.values())))
    assert {truth[slot_key(f"dev{i}", "t0")] for i in range(DEVICES)} == {"type", "group"}

    # Execute
    records = run_rounds(coordinator, agents, agg)

    # Assert: every slot reported every round; the last clustering is the true task split
    assert [len(r.devices) for r in records] == [2 * DEVICES] * ROUNDS
    assert not coordinator.rejections
    final, _, clusters = split_global_tensors(store.global_at(ROUNDS))
    assignment = store.latest()[2]["assignment"]
    slots = sorted(truth)
    assert sorted(assignment) == slots and len(clusters) == 2
    assert cluster_agreement(np.array([assignment[s] for s in slots]),
                             np.array([truth[s] for s in slots])) == 1.0
    # Each cluster adapter is the sample-weighted mean of its slots' last updates, and the
    # plain adapter (for slots never seen) is the mean over all slots.
    last = store.accepted_by_slot(ROUNDS - 1)
    for c, cluster in enumerate(clusters):
        want = fedavg([last[s] for s in slots if assignment[s] == c])
        for name in want:
            np.testing.assert_allclose(cluster[name], want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final["head.weight"], fedavg(list(last.values()))["head.weight"],
                               rtol=1e-5, atol=1e-6)

    # A restarted aggregator resumes with the same clusters and assignment
    resumed = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"))
    assert resumed.round == ROUNDS and resumed.state.assignment == assignment
    for got, want in zip(resumed.state.clusters, clusters, strict=True):
        np.testing.assert_array_equal(got["head.weight"], want["head.weight"])

    # Each cluster is better at its own task than the other cluster's adapter
    test = fmnist.load("t10k").subset(np.arange(640))
    scorer = make_trainer("onnxruntime", cnn_artifacts)
    accuracy = {}
    for c, cluster in enumerate(clusters):
        scorer.set_adapter(cluster)
        for kind in fmnist.TASK_LABELLINGS:
            _, accuracy[c, kind] = evaluate_dataset(scorer, test.x, fmnist.task_labels(kind, test.y))
    group_cluster = assignment[next(s for s in slots if truth[s] == "group")]
    type_cluster = 1 - group_cluster
    assert accuracy[group_cluster, "group"] > accuracy[type_cluster, "group"] + 0.2, accuracy
    assert accuracy[type_cluster, "type"] > accuracy[group_cluster, "type"] + 0.2, accuracy

