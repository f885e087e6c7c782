"""Hierarchical federation over Mosquitto bridges (aggregator.tiers): two gateways, each with its
own broker and devices, send their rounds' partial sums upstream through a bridge; the upstream
global equals one flat FedAvg over every device, and comes back down to every gateway."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig
from aggregator.store import GlobalStore
from aggregator.strategies import fedavg
from aggregator.tiers import GatewayMerger, GatewayTier
from protocol import codec, topics
from protocol.codec import DecodeError
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, PartialSum, Update
from tests.test_round_aggregators import FED, MANIFEST, ZERO, Message, _full
from tests.test_storage_faults import QueueTransport
from transport.broker import Broker, bridge_conf
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent


def _partial(gateway: str, value: float, weight: float, round_number: int = 0,
             count: int = 2) -> PartialSum:
    sums = {k: v.astype(np.float64) * weight for k, v in _full(value).items()}
    return PartialSum(FED, round_number, gateway, MANIFEST.sha256, weight, count, sums,
                      {"loss": 0.5 * weight})


def _merger(folder: Path) -> GatewayMerger:
    config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=2, min_clients=2,
                              allowed_devices=frozenset({"g1", "g2"}))
    return GatewayMerger(config, MANIFEST, ZERO, QueueTransport(), GlobalStore(folder))


def _send(merger: GatewayMerger, partial: PartialSum) -> None:
    merger.handle(Message(topics.partial_topic(FED, partial.gateway_id),
                          codec.encode_partial(partial)))


def test_partial_sums_round_trip_exactly() -> None:
    partial = _partial("g1", 1 / 3, 7.0)
    back = codec.decode_partial(codec.encode_partial(partial))
    assert (back.gateway_id, back.weight, back.count, back.metric_sums) == ("g1", 7.0, 2,
                                                                             {"loss": 3.5})
    for name, value in partial.sums.items():
        assert back.sums[name].dtype == np.float64
        np.testing.assert_array_equal(back.sums[name], value)


def test_a_partial_sum_must_be_float64_with_a_positive_weight() -> None:
    partial = _partial("g1", 1.0, 2.0)
    as_float32 = codec._pack("partial", {
        "federation": FED, "round": 0, "gateway_id": "g1", "manifest_sha256": MANIFEST.sha256,
        "weight": 2.0, "count": 2, "metric_sums": {}, "bytes": 0},
        {k: v.astype(np.float32) for k, v in partial.sums.items()})
    with pytest.raises(DecodeError, match="not float64"):
        codec.decode_partial(as_float32)
    with pytest.raises(ValueError, match="weight must be a positive"):
        PartialSum(FED, 0, "g1", MANIFEST.sha256, 0.0, 1, partial.sums)


def test_the_upstream_merges_gateways_exactly(tmp_path: Path) -> None:
    merger = _merger(tmp_path)
    _send(merger, _partial("g1", 1.0, 30.0))
    _send(merger, _partial("g1", 1.0, 30.0))  # sent again (the gateway's republish timer)
    _send(merger, _partial("g3", 5.0, 10.0))  # not one of ours
    _send(merger, _partial("g2", 0.5, 1e12))  # more weight than 2 updates can carry
    _send(merger, _partial("g2", 4.0, 10.0, round_number=1))  # a round early
    _send(merger, _partial("g2", 4.0, 10.0))
    assert merger.rejections == {"duplicate": 1, "unknown-device": 1, "tensors": 1,
                                 "future-round": 1}
    record = merger._close_round()
    # (30·1 + 10·4) / 40 = 70 / 40 = 1.75; loss (0.5·30 + 0.5·10) / 40 = 0.5
    assert record.devices == ("g1", "g2") and record.metrics == {"loss": 0.5}
    for value in merger.adapter.values():
        np.testing.assert_allclose(value, 1.75, rtol=1e-7)


# -- two gateways on their own Mosquitto, bridged to an upstream one, through the CLI ---------
HFED = "tiers"
ROUNDS = 2
DEVICES = {"g1": ["a1", "a2", "a3"], "g2": ["b1", "b2"]}


def _aggregator(broker: Broker, artifacts: Path, state: Path, *extra: str,
                federation: str = HFED, rounds: int = ROUNDS) -> subprocess.Popen[bytes]:
    state.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "edgefl", "-v", "aggregator", "--host", broker.host, "--port",
         str(broker.port), "--federation", federation, "--artifacts", str(artifacts),
         "--rounds", str(rounds), "--deadline", "600", "--state-dir", str(state), *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(state.with_suffix(".log"), "wb"))


def assert_fedavg(adapter: dict[str, np.ndarray], updates: list[Update]) -> None:
    """`adapter` is FedAvg of the updates' full adapters, weighted by their sample counts."""
    expected = fedavg([(u.adapter, float(u.num_samples)) for u in updates])
    for name in expected:
        np.testing.assert_allclose(adapter[name], expected[name], rtol=1e-6, atol=1e-7)


def stop_all(clients: list[MqttTransport], procs: list[subprocess.Popen[bytes]]) -> None:
    """Disconnect the test's clients and kill whatever aggregator is still running."""
    for client in clients:
        client.stop()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _next_global(watcher: MqttTransport, round_number: int, seconds: float = 90
                 ) -> tuple[GlobalModel, bytes]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = watcher.receive(0.5)
        if message is not None:
            model = codec.decode_global(message.payload)
            if model.round == round_number:
                return model, message.payload
    raise AssertionError(f"no global for round {round_number} within {seconds}s")


def test_two_bridged_gateways_give_the_flat_fedavg_global(cnn_artifacts: Path,
                                                            tmp_path: Path) -> None:
    manifest = load_manifest(cnn_artifacts)
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(3)
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[MqttTransport] = []
    with Broker() as upstream:
        gateways = {g: Broker(bridge=bridge_conf(g, upstream.host, upstream.port,
                                                   topics.bridge_topics()))
                    for g in DEVICES}
        try:
            procs.append(_aggregator(upstream, cnn_artifacts, tmp_path / "up",
                                     "--merge-gateways", "g1,g2"))
            for g, devices in DEVICES.items():
                # Its own --rounds is not used: upstream's final global ends the gateway too.
                procs.append(_aggregator(gateways[g], cnn_artifacts, tmp_path / g, "--upstream",
                                         g, "--clients-per-round", str(len(devices)),
                                         "--min-clients", str(len(devices)), rounds=7))
            watchers = {}
            for name, broker in [("up", upstream), *gateways.items()]:
                watchers[name] = MqttTransport(broker.host, broker.port, f"watch-{name}")
                watchers[name].start()
                watchers[name].subscribe(topics.global_topic(HFED))
                clients.append(watchers[name])
            publishers = {g: MqttTransport(b.host, b.port, f"devices-{g}")
                          for g, b in gateways.items()}
            for publisher in publishers.values():
                publisher.start()
                clients.append(publisher)
            for g in DEVICES:  # each gateway aggregator relays round 0 once it is ready
                _next_global(watchers[g], 0)
            for round_number in range(ROUNDS):
                sent = []
                for g, devices in DEVICES.items():
                    for device in devices:
                        adapter = {k: (v + rng.standard_normal(v.shape)).astype(np.float32)
                                   for k, v in initial.items()}
                        update = Update(HFED, round_number, device, manifest.sha256,
                                        int(rng.integers(32, 640)), uuid.uuid4().hex, adapter)
                        publishers[g].publish(topics.update_topic(HFED, device),
                                              codec.encode_update(update))
                        sent.append(update)
                model, payload = _next_global(watchers["up"], round_number + 1)
                assert_fedavg(model.adapter, sent)  # one flat FedAvg over all five devices
                for g in DEVICES:  # and each gateway relays exactly that global
                    assert _next_global(watchers[g], round_number + 1)[1] == payload
            assert model.final
            for proc in procs:
                proc.wait(60)
        finally:
            stop_all(clients, procs)
            for broker in gateways.values():
                broker.stop()
    for proc in procs:
        assert proc.returncode == 0


@pytest.mark.parametrize("option", [["--upstream", "g1"], ["--merge-gateways", "g1,g2"]])
def test_a_strategy_that_cannot_merge_is_refused_in_one_line(option: list[str], tmp_path: Path,
                                                             cnn_artifacts: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgefl", "aggregator", "--port", "1", "--artifacts",
         str(cnn_artifacts), "--strategy", "trimmed_mean", "--min-clients", "5",
         "--clients-per-round", "5", "--state-dir", str(tmp_path), *option],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{option[0]} merges partial weighted sums" in lines[0], lines


def _gateway_tier(folder: Path, transport: QueueTransport) -> GatewayTier:
    config = AggregatorConfig(federation=FED, rounds=3, clients_per_round=2, min_clients=2)
    return GatewayTier(config, MANIFEST, ZERO, transport, GlobalStore(folder), gateway_id="g1")


def _update(device: str, value: float, samples: int, round_number: int = 0) -> Message:
    update = Update(FED, round_number, device, MANIFEST.sha256, samples, uuid.uuid4().hex,
                    _full(value))
    return Message(topics.update_topic(FED, device), codec.encode_update(update))


def test_a_gateway_restarted_after_sealing_sends_the_same_sum_and_takes_no_more(
        tmp_path: Path) -> None:
    transport = QueueTransport()
    gateway = _gateway_tier(tmp_path, transport)
    gateway.handle(_update("d1", 1.0, 10))
    gateway.handle(_update("d2", 4.0, 30))
    assert gateway._round_ready()
    gateway._seal()
    (topic, payload), = transport.published
    sent = codec.decode_partial(payload)
    assert topic == topics.partial_topic(FED, "g1")
    # Σ w·x = 10·1 + 30·4 = 130 per entry, over W = 40 from 2 updates
    assert (sent.weight, sent.count) == (40.0, 2)
    np.testing.assert_array_equal(sent.sums["head.bias"], 130.0)
    again = QueueTransport()  # the gateway process dies here and starts again
    restarted = _gateway_tier(tmp_path, again)
    restarted.transport.inbox.put(_update("d3", 9.0, 10))  # too late for the sealed round
    restarted.run(stop=lambda: again.inbox.empty() and bool(again.acked))
    assert restarted.rejections == {"stale-round": 1}
    resent = [codec.decode_partial(p) for t, p in again.published if "/partial/" in t]
    assert resent and resent[0].weight == 40.0
    np.testing.assert_array_equal(resent[0].sums["head.bias"], sent.sums["head.bias"])
    # The upstream global of round 1 opens the next round here, and is relayed to devices.
    model = GlobalModel(FED, 1, MANIFEST.sha256, _full(3.25))
    upstream = codec.encode_global(model)
    again.inbox.put(Message(topics.upstream_global_topic(FED), upstream))
    restarted.run(stop=lambda: restarted.round == 1)
    assert restarted.round == 1 and not restarted._sealed
    assert (topics.global_topic(FED), upstream) in again.published  # the same bytes


def test_real_devices_behind_two_gateways_train_the_flat_fedavg_model(
        cnn_artifacts: Path, tmp_path: Path) -> None:
    """ExecuTorch and ONNX Runtime devices train on their own data behind two bridged gateways;
    every upstream global is the FedAvg of the updates the devices actually sent."""
    import threading

    from edge_client.agent import DeviceAgent, device_seed
    from edge_client.data import device_partitions
    from edge_client.trainer import make_trainer

    fed, rounds = "tiersreal", 2
    layout = {"g1": ["et-1", "ort-1"], "g2": ["et-2", "ort-2"]}
    private, parts = device_partitions(4, alpha=0.5, seed=2)
    procs: list[subprocess.Popen[bytes]] = []
    spies: dict[str, MqttTransport] = {}
    with Broker() as upstream:
        gateways = {g: Broker(bridge=bridge_conf(g, upstream.host, upstream.port,
                                                   topics.bridge_topics())) for g in layout}
        watcher = MqttTransport(upstream.host, upstream.port, "watch-up")
        try:
            watcher.start()
            watcher.subscribe(topics.global_topic(fed))
            procs.append(_aggregator(upstream, cnn_artifacts, tmp_path / "up", "--local-steps",
                                     "10", "--merge-gateways", "g1,g2", federation=fed,
                                     rounds=rounds))
            for g, devices in layout.items():
                procs.append(_aggregator(gateways[g], cnn_artifacts, tmp_path / g, "--upstream",
                                         g, "--clients-per-round", "2", "--min-clients", "2",
                                         federation=fed, rounds=rounds))
                spies[g] = MqttTransport(gateways[g].host, gateways[g].port, f"spy-{g}")
                spies[g].start()
                spies[g].subscribe(topics.update_filter(fed))
            agents, index = [], 0
            for g, devices in layout.items():
                for device in devices:
                    backend = "executorch" if device.startswith("et") else "onnxruntime"
                    data = private.subset(parts[index])
                    index += 1
                    transport = MqttTransport(gateways[g].host, gateways[g].port, device,
                                              will=DeviceAgent.will(fed, device))
                    agents.append(DeviceAgent(device, fed, make_trainer(backend, cnn_artifacts),
                                              data.x, data.y, transport, tmp_path / "devices",
                                              seed=device_seed(device)))
            threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
            for thread in threads:
                thread.start()
            globals_up = [_next_global(watcher, r + 1, 180)[0] for r in range(rounds)]
            for thread in threads:
                thread.join(60)
            for proc in procs:
                proc.wait(60)
        finally:
            watcher.stop()
            for spy in spies.values():
                spy.stop()
            stop_all([], procs)
            for broker in gateways.values():
                broker.stop()
    assert all(proc.returncode == 0 for proc in procs)
    assert [a.rounds_trained for a in agents] == [rounds] * 4
    sent: dict[int, dict[str, Update]] = {}
    for spy in spies.values():
        while (message := spy.receive(0.5)) is not None:
            update = codec.decode_update(message.payload)
            sent.setdefault(update.round, {})[update.device_id] = update  # resends: same bytes
    for r, model in enumerate(globals_up):
        updates = list(sent[r].values())
        assert sorted(u.device_id for u in updates) == ["et-1", "et-2", "ort-1", "ort-2"]
        assert_fedavg(model.adapter, updates)


def test_tls_gateways_bridge_to_a_tls_upstream(cnn_artifacts: Path, tmp_path: Path) -> None:
    """The same topology on gateways provisioned by `edgefl gateway init`: TLS everywhere,
    signed device updates, each bridge an identity enrolled upstream under its gateway id."""
    import os
    import shutil
    import tempfile

    from edgefl.gateway import _broker_user, init_gateway
    from protocol.signing import load_private_key, sign_payload
    from tests.test_gateway_security import start_broker, stop_broker
    from transport.broker import free_port

    root = Path(tempfile.mkdtemp(prefix="edgefl-tiers-"))
    root.chmod(0o755)  # Mosquitto may run as its own user: it must reach these folders
    fed, devices = "tlstiers", {"g1": ["a1", "a2"], "g2": ["b1"]}
    brokers, procs, clients = [], [], []
    try:
        up = init_gateway(root / "up", list(devices), port=free_port())
        gws = {g: init_gateway(root / g, ids, port=free_port()) for g, ids in devices.items()}
        for g, files in gws.items():
            # The bridge connects upstream as identity g: a copy of its files that the broker's
            # own user can read.
            tls = up.tls_for(g)
            bridge_dir = root / f"bridge-{g}"
            bridge_dir.mkdir()
            copies = [Path(shutil.copy(f, bridge_dir)) for f in (tls.ca, tls.cert, tls.key)]
            if (user := _broker_user()) is not None:
                import pwd
                entry = pwd.getpwnam(user)
                for path in copies:
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            with open(files.mosquitto_conf, "a") as conf:
                conf.write(bridge_conf(g, up.host, up.port, topics.bridge_topics(),
                                       (copies[0], copies[1], copies[2])))
        brokers = [start_broker(up), *(start_broker(f) for f in gws.values())]
        common = ["--federation", fed, "--artifacts", str(cnn_artifacts), "--rounds", "1",
                  "--deadline", "600"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edgefl", "aggregator", "--gateway", str(up.out_dir),
             *common, "--merge-gateways", "g1,g2", "--state-dir", str(tmp_path / "up")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for g, files in gws.items():
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgefl", "aggregator", "--gateway", str(files.out_dir),
                 *common, "--upstream", g, "--clients-per-round", str(len(devices[g])),
                 "--min-clients", str(len(devices[g])), "--state-dir", str(tmp_path / g)],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        manifest = load_manifest(cnn_artifacts)
        initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
        rng = np.random.default_rng(5)
        sent = []
        for g, files in gws.items():
            for device in devices[g]:
                transport = MqttTransport(files.host, files.port, device,
                                          tls=files.tls_for(device))
                transport.start()
                clients.append(transport)
                transport.subscribe(topics.global_topic(fed))
                assert transport.receive(60) is not None  # the gateway relayed round 0
                update = Update(fed, 0, device, manifest.sha256, int(rng.integers(32, 640)),
                                uuid.uuid4().hex,
                                {k: (v + rng.standard_normal(v.shape)).astype(np.float32)
                                 for k, v in initial.items()})
                key = load_private_key(files.signing_keys[device])
                transport.publish(topics.update_topic(fed, device),
                                  sign_payload(key, device, codec.encode_update(update)))
                sent.append(update)
        for proc in procs:
            proc.wait(90)
    finally:
        stop_all(clients, procs)
        for broker in brokers:
            stop_broker(broker)
        shutil.rmtree(root, ignore_errors=True)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    final = GlobalStore(tmp_path / "up" / fed).global_at(1)
    assert final is not None
    assert_fedavg(final, sent)


def test_an_upstream_restarted_mid_round_keeps_the_sums_it_counted(tmp_path: Path) -> None:
    merger = _merger(tmp_path)
    _send(merger, _partial("g1", 2.0, 10.0))
    again = _merger(tmp_path)  # the upstream aggregator dies here and starts again
    assert again.open.reported == {"g1": "g1.0"}
    _send(again, _partial("g1", 2.0, 10.0))  # g1 resends its sum until the global comes
    _send(again, _partial("g2", 5.0, 20.0))
    assert again.rejections == {"duplicate": 1}
    again._close_round()
    # (10·2 + 20·5) / 30 = 120 / 30 = 4
    for value in again.adapter.values():
        np.testing.assert_allclose(value, 4.0, rtol=1e-7)
