"""Each strategy family through the coordinator: configuration refusals, durable restart in the
middle of a round, DP's budget and noise, FedBuff's damping and the sample-weight cap.

Updates go through `Coordinator.handle` exactly as the MQTT loop hands them over (encoded
payloads on update topics); the transport is an in-memory stub that keeps what is published.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from aggregator.accounting import epsilon
from aggregator.coordinator import AggregatorConfig, Coordinator
from aggregator.registry import STRATEGY_NAMES, make_family
from aggregator.store import GlobalStore
from protocol import codec, topics
from protocol.manifest import Manifest, TensorSpec
from protocol.messages import Update
from protocol.tensors import TensorDict

FED = "fam"
SHAPES = {"fc1.lora_A.weight": (2, 3), "fc1.lora_B.weight": (4, 2), "head.bias": (2,)}


def _manifest(shapes: dict[str, tuple[int, ...]] = SHAPES) -> Manifest:
    return Manifest(
        workload="toy", base_sha256="0" * 64, batch_size=2, input_shape=(2, 3),
        input_dtype="float32", labels=("a", "b"), lora={"r": 2, "alpha": 4},
        tensors=tuple(TensorSpec(name, name, shape) for name, shape in shapes.items()))


MANIFEST = _manifest()
ZERO = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


@dataclass
class Message:
    """A received MQTT message, as MqttTransport hands it to the coordinator."""

    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 1


class StubTransport:
    """In-memory transport: keeps every publish, delivers nothing by itself."""

    bytes_sent = 0
    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def receive(self, timeout: float | None = None) -> None:
        return None

    def ack(self, message: object) -> None: ...


def _full(value: float) -> TensorDict:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def _coordinator(folder: Path, **config: object) -> Coordinator:
    fields: dict[str, object] = dict(federation=FED, rounds=5, clients_per_round=2,
                                     min_clients=1)
    fields.update(config)
    return Coordinator(AggregatorConfig(**fields), MANIFEST, ZERO, StubTransport(),  # type: ignore[arg-type]
                       GlobalStore(folder))


def _send(coordinator: Coordinator, device: str, adapter: TensorDict, samples: int = 10,
          round_number: int | None = None, metrics: dict[str, float] | None = None) -> None:
    update = Update(FED, coordinator.round if round_number is None else round_number, device,
                    MANIFEST.sha256, samples, uuid.uuid4().hex, adapter, metrics or {})
    coordinator.handle(Message(topics.update_topic(FED, device), codec.encode_update(update)))


def _close(coordinator: Coordinator) -> TensorDict:
    record = coordinator._close_round()
    assert record.devices
    return coordinator.adapter


# -- configuration refusals --------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "manifest", "words"), [
    (dict(strategy="exact"), _manifest({**SHAPES, "fc1.lora_S.weight": (2, 2)}), "personal"),
    (dict(strategy="fed-talora", task_schedule=((0,), (1,))),
     _manifest({**SHAPES, "fc1.lora_S.weight": (2, 2)}), "personal"),
    (dict(strategy="exact"), _manifest({"head.bias": (2,)}), "LoRA layers"),
    (dict(strategy="fedmedian", mode="async"), MANIFEST, "async"),
    (dict(strategy="exact", mode="async"), MANIFEST, "async"),
    (dict(strategy="dp-fedavg", mode="async", clip_norm=1.0, dp_noise_multiplier=1.0),
     MANIFEST, "async"),
    (dict(strategy="trimmed_mean", clients_per_round=4, min_clients=3), MANIFEST,
     "--min-clients to at least 5"),
    (dict(strategy="dp-fedavg", clip_norm=1.0), MANIFEST, "--dp-noise"),
    (dict(strategy="dp-fedavg", clip_norm=1.0, dp_noise_multiplier=0.0), MANIFEST, "positive"),
    (dict(strategy="fed-talora"), MANIFEST, "task schedule"),
    (dict(strategy="fltac", num_clusters=5, clients_per_round=4), MANIFEST, "--clusters 5"),
    (dict(strategy="fltac", task_schedule=((0,), (1,))), MANIFEST, "task schedule"),
    (dict(strategy="nope"), MANIFEST, "unknown strategy"),
])
def test_combinations_that_would_break_are_refused(fields: dict, manifest: Manifest,
                                                   words: str) -> None:
    config = AggregatorConfig(**{"clients_per_round": 3, "min_clients": 2, **fields})
    with pytest.raises(ValueError, match=words) as info:
        make_family(config, manifest)
    assert "\n" not in str(info.value)  # one clear line


def test_every_registered_strategy_builds_with_sensible_settings() -> None:
    for name in STRATEGY_NAMES:
        config = AggregatorConfig(strategy=name, clients_per_round=5, min_clients=5,
                                  clip_norm=1.0, dp_noise_multiplier=1.0,
                                  task_schedule=((0,), (1,)) if name == "fed-talora" else ())
        assert make_family(config, MANIFEST) is not None


# -- restart in the middle of a round ---------------------------------------------------------
@pytest.mark.parametrize("config", [
    dict(strategy="fedavg"), dict(strategy="fedmedian", clients_per_round=3),
    dict(strategy="exact"), dict(strategy="fltac", num_clusters=2, clients_per_round=3),
    dict(strategy="fedavg", mode="async"),
])
def test_a_round_resumed_after_a_restart_closes_as_if_never_interrupted(
        tmp_path: Path, config: dict) -> None:
    adapters = [_full(1.0), _full(2.0), _full(6.0)]
    adapters[2]["fc1.lora_A.weight"][0, 0] = -3.0  # not all proportional: a real residual
    n = int(config.get("clients_per_round", 2))

    straight = _coordinator(tmp_path / "a", **config)
    for i in range(n):
        _send(straight, f"d{i}", adapters[i], samples=10 * (i + 1))
    expected = _close(straight)

    first = _coordinator(tmp_path / "b", **config)
    _send(first, "d0", adapters[0], samples=10)
    first.store.close()
    resumed = _coordinator(tmp_path / "b", **config)  # as after a SIGKILL
    assert list(resumed.open.reported) == ["d0"]
    for i in range(1, n):
        _send(resumed, f"d{i}", adapters[i], samples=10 * (i + 1))
    got = _close(resumed)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert resumed.state.residual.keys() == straight.state.residual.keys()
    for name, tensor in straight.state.residual.items():  # exact: the residual too
        np.testing.assert_array_equal(resumed.state.residual[name], tensor)


# -- differential privacy ----------------------------------------------------------------------
DP = dict(strategy="dp-fedavg", clients_per_round=2, clip_norm=1.0, dp_noise_multiplier=1.0,
          seed=0)


def test_dp_noise_differs_between_identical_runs_with_the_same_seed(tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        coordinator = _coordinator(tmp_path / name, **DP)
        _send(coordinator, "d0", _full(0.1))
        _send(coordinator, "d1", _full(0.2))
        results.append(_close(coordinator))
    assert not np.array_equal(results[0]["head.bias"], results[1]["head.bias"])


def test_dp_rounds_report_no_device_metrics_and_keep_epsilon_across_a_restart(
        tmp_path: Path) -> None:
    coordinator = _coordinator(tmp_path, **DP)
    _send(coordinator, "d0", _full(0.1), metrics={"train_loss": 0.25})
    _send(coordinator, "d1", _full(0.2), metrics={"train_loss": 0.75})
    record = coordinator._close_round()
    assert record.metrics == {}
    assert all(s.metrics == {} for s in coordinator.snapshot().history)
    spent = coordinator.snapshot().family["epsilon"]
    assert spent == pytest.approx(epsilon(1.0, 1, 1e-5))
    coordinator.store.close()
    resumed = _coordinator(tmp_path, **DP)
    assert resumed.snapshot().family["epsilon"] == spent
    assert resumed.snapshot().family["dp_rounds"] == 1


def test_dp_federation_stops_before_a_round_that_would_exceed_the_budget(
        tmp_path: Path) -> None:
    budget = (epsilon(1.0, 2, 1e-5) + epsilon(1.0, 3, 1e-5)) / 2  # two rounds fit, three do not
    coordinator = _coordinator(tmp_path, **DP, rounds=10, dp_max_epsilon=budget)
    for _ in range(2):
        assert not coordinator.snapshot().finished
        _send(coordinator, "d0", _full(0.1))
        _close(coordinator)
    assert coordinator.snapshot().finished
    assert coordinator.snapshot().family["epsilon"] <= budget
    coordinator.run()  # publishes the final global at once instead of opening round 3
    final = codec.decode_global(coordinator.transport.published[-1][1])
    assert final.final and final.round == 2


# -- FedBuff and weights ---------------------------------------------------------------------
def test_fedbuff_damps_a_buffer_of_stale_updates(tmp_path: Path) -> None:
    coordinator = _coordinator(tmp_path, mode="async", max_staleness=4, clients_per_round=2)
    for _ in range(3):  # versions 1..3 from fresh updates of +0 (the adapter stays 0)
        _send(coordinator, "a", ZERO)
        _send(coordinator, "b", ZERO)
        _close(coordinator)
    # Both updates started from version 0: staleness 3, discount 1/sqrt(1+3) = 1/2. FedBuff
    # normalises by K = 2, not by the discounted weights: 0 + (½·4 + ½·4)/2 = 2, not 4.
    _send(coordinator, "a", _full(4.0), round_number=0)
    _send(coordinator, "b", _full(4.0), round_number=0)
    np.testing.assert_allclose(_close(coordinator)["head.bias"], [2.0, 2.0])


def test_a_huge_sample_count_is_capped(tmp_path: Path) -> None:
    coordinator = _coordinator(tmp_path, max_samples=100)
    _send(coordinator, "honest", _full(1.0), samples=100)
    _send(coordinator, "liar", _full(3.0), samples=2**31 - 1)  # the most the protocol allows
    # capped to 100 each: (1·100 + 3·100) / 200 = 2 (uncapped it would be ≈ 3)
    np.testing.assert_allclose(_close(coordinator)["head.bias"], [2.0, 2.0])


def test_state_keeps_only_recent_rounds(tmp_path: Path) -> None:
    # fedmedian keeps every update's adapter until its round is pruned
    coordinator = _coordinator(tmp_path, strategy="fedmedian", rounds=20, keep_rounds=3)
    for value in range(12):
        _send(coordinator, "a", _full(float(value)))
        _send(coordinator, "b", _full(float(value)))
        _close(coordinator)
    store = coordinator.store
    assert store.history() == [9, 10, 11, 12]  # round 12 is open; 3 closed rounds before it
    assert store.accepted_adapters(8) == []  # pruned
    assert len(store.accepted_adapters(11)) == 2  # kept
    # update ids stay (a redelivered old update is still a duplicate): 12 rounds × 2
    (rows,) = store.db.execute("SELECT COUNT(*) FROM accepted").fetchone()
    assert rows == 24
