"""A whole federation over TLS with signed updates, through the real `edgefl` commands."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from edgefl.gateway import GatewayFiles
from protocol import codec, topics
from protocol.manifest import load_manifest
from protocol.messages import Update
from protocol.signing import generate_signing_key, load_private_key, sign_payload
from tests.test_gateway_security import gateway, gateway_dir  # noqa: F401 - fixtures
from transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parent.parent


def _edgefl(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgefl", "-v", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_tls_federation_accepts_signed_updates_and_rejects_forgeries(
    gateway: GatewayFiles, cnn_artifacts: Path, tmp_path: Path  # noqa: F811
) -> None:
    # Prepare: the aggregator waits for both devices; dev-a's certificate is also used to send
    # forgeries before the real devices report
    federation = f"sec-{uuid.uuid4().hex[:6]}"
    manifest = load_manifest(cnn_artifacts)
    common = ["--federation", federation, "--gateway", str(gateway.out_dir),
              "--artifacts", str(cnn_artifacts), "--state-dir", str(tmp_path / "state")]
    aggregator = _edgefl("aggregator", *common, "--rounds", "1", "--clients-per-round", "2",
                         "--min-clients", "2", "--local-steps", "3")
    forger = MqttTransport(gateway.host, gateway.port, "forger", tls=gateway.tls_for("dev-a"))
    forger.start()
    forger.subscribe(topics.global_topic(federation))
    assert forger.receive(30) is not None, "the aggregator never opened round 0"
    initial = load_file(str(cnn_artifacts / manifest.files["adapter_init"]))
    forged = codec.encode_update(Update(federation, 0, "dev-a", manifest.sha256, 10**6,
                                        uuid.uuid4().hex, {k: v * 100 for k, v in initial.items()}))
    update_topic = topics.update_topic(federation, "dev-a")
    forger.publish(update_topic, forged)  # unsigned
    forger.publish(update_topic, sign_payload(generate_signing_key(), "dev-a", forged))  # other key
    dev_b_key = load_private_key(gateway.signing_keys["dev-b"])
    forger.publish(update_topic, sign_payload(dev_b_key, "dev-b", forged))  # dev-b's frame on a's topic
    forger.stop()

    # Execute: the two real devices train one round over TLS and sign their updates
    clients = [_edgefl("client", *common, "--device-id", device, "--index", str(i),
                       "--num-devices", "2", "--backend", "onnxruntime")
               for i, device in enumerate(("dev-a", "dev-b"))]
    outputs = [c.communicate(timeout=180)[0] for c in clients]
    agg_output = aggregator.communicate(timeout=60)[0]

    # Assert: the round closed with exactly the two genuine updates
    assert aggregator.returncode == 0, agg_output
    assert all(c.returncode == 0 for c in clients), outputs
    assert "round 0: 2 devices" in agg_output, agg_output
    for reason in ("signature-unsigned", "signature-bad-signature", "signature-device-mismatch"):
        assert reason in agg_output, reason
    assert all("trained 1 rounds" in out for out in outputs), outputs
    from aggregator.store import GlobalStore

    store = GlobalStore(tmp_path / "state" / federation)
    final = store.global_at(1)
    assert final is not None
    assert np.abs(final["head.weight"]).max() < 50, "a forged x100 update got in"
