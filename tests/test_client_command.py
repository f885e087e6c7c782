"""Every workload trains through `edgefl client`: its own data, Mosquitto, an accepted update."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.store import GlobalStore
from export.build import build_artifacts
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads import WORKLOAD_NAMES

REPO = Path(__file__).resolve().parent.parent
FED = "client"
# MiniLM at batch 4 (the parity test's export, shared through the cache): its steps are short.
BATCH = {"minilm-fortunes": 4, "minilm-colora": 4}
# Each workload on one runtime, the two runtimes in turn (both are covered per workload elsewhere).
CASES = [(name, ("executorch", "onnxruntime")[i % 2]) for i, name in enumerate(WORKLOAD_NAMES)]


@pytest.mark.slow
@pytest.mark.parametrize(("workload", "backend"), CASES)
def test_the_client_command_trains_the_workloads_own_data(
    workload: str, backend: str, mosquitto: Broker, tmp_path: Path
) -> None:
    # Prepare: an in-process aggregator waiting for one update in one round
    artifacts = build_artifacts(workload, batch_size=BATCH.get(workload))
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    agg = MqttTransport(mosquitto.host, mosquitto.port, "agg", manual_ack=True,
                        persistent_session=True)
    agg.start()
    config = AggregatorConfig(federation=FED, rounds=1, clients_per_round=1, min_clients=1,
                              round_deadline_s=240, train=TrainConfig(local_steps=2))
    coordinator = Coordinator(config, manifest, initial, agg, GlobalStore(tmp_path / "agg"))
    client = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "client", "--workload", workload,
         "--artifacts", str(artifacts), "--backend", backend, "--host", mosquitto.host,
         "--port", str(mosquitto.port), "--federation", FED, "--index", "1",
         "--num-devices", "3", "--state-dir", str(tmp_path / "device")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    # Execute
    try:
        # A client that dies never reports: stop waiting then, and show its output below.
        records = coordinator.run(stop=lambda: client.poll() is not None)
        out, err = client.communicate(timeout=120)
    finally:
        client.kill()
        agg.stop()

    # Assert: the device trained and exited cleanly, and its update was accepted
    assert client.returncode == 0, out + err
    assert "device-001: trained 1 rounds" in out
    assert [r.devices for r in records] == [("device-001",)]
    assert not coordinator.rejections
