"""Run a whole federation in one process: broker, aggregator and an emulated fleet of devices.

`edgefl demo` is a small mixed ExecuTorch / ONNX Runtime fleet; `edgefl emulate` is the same
machinery with hundreds to thousands of devices and unreliable behaviour.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.numpy import load_file

from aggregator.coordinator import AggregatorConfig, Coordinator, RoundRecord
from aggregator.store import GlobalStore
from edge_client.fleet import (
    DEVICES_PER_PROCESS,
    FleetConfig,
    FleetProcesses,
    build_fleet,
    start_fleet,
)
from edge_client.trainer import evaluate_dataset, make_trainer
from export.build import build_artifacts
from protocol.codec import encode_global
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from protocol.tensors import TensorDict
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads import fmnist

logger = logging.getLogger(__name__)

FLEET_WORKLOADS = ("fmnist-cnn", "fmnist-fedsq", "fmnist-colora")  # fleets hold Fashion-MNIST shares


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """A run: the fleet, the round policy and where results go."""

    fleet: FleetConfig = field(default_factory=lambda: FleetConfig(
        devices=6, backends=("executorch", "onnxruntime")))
    rounds: int = 6
    local_steps: int = 20
    learning_rate: float = 0.05
    participation: float = 1.0  # fraction of the fleet that closes a round early
    quorum: float = 0.5  # fraction that closes it at the deadline
    deadline_s: float = 300.0
    mode: str = "sync"
    update_encoding: str = "fp32"  # compact encodings make devices send quantised deltas
    update_topk: float | None = None
    strategy: str = "fedavg"
    eval_size: int = 2000
    workload: str = "fmnist-cnn"  # or "fmnist-fedsq": the same CNN with FedSQ's fixed gates
    out_dir: Path = Path("runs/demo")
    broker: str = "mosquitto"  # or "amqtt" to force the embedded broker


@dataclass
class RoundRow:
    """One line of the per-round table."""

    round: int
    accuracy: float
    loss: float
    devices: int
    bytes_up: int
    bytes_down: int
    seconds: float

    @property
    def bytes_per_update(self) -> float:
        """Mean payload of one device update this round."""
        return self.bytes_up / self.devices if self.devices else 0.0


@dataclass
class FederationResult:
    """Everything a run measured; also written to results.json."""

    broker: str
    data_source: str
    rows: list[RoundRow] = field(default_factory=list)
    rejections: dict[str, int] = field(default_factory=dict)
    skipped_rounds: int = 0
    links_lost: int = 0

    @property
    def improved(self) -> bool:
        """Whether the final global adapter beats the initial one."""
        return len(self.rows) > 1 and self.rows[-1].accuracy > self.rows[0].accuracy


def run_federation(config: FederationConfig, console: Console | None = None) -> FederationResult:
    """Run the federation to its last round and print the per-round table."""
    console = console or Console()
    fleet = config.fleet
    # 1. artifacts: built once, then reused from the cache
    if config.workload not in FLEET_WORKLOADS:
        raise ValueError(f"fleets run {FLEET_WORKLOADS}, not {config.workload!r}")
    with console.status(f"exporting {config.workload}'s training programs (cached after)"):
        artifacts = build_artifacts(config.workload)
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    test = fmnist.load("t10k")
    test = test.subset(np.arange(min(config.eval_size, len(test))))
    evaluator = make_trainer("onnxruntime", artifacts)  # fastest backend for scoring globals

    def score(adapter: TensorDict) -> tuple[float, float]:
        evaluator.set_adapter(adapter)
        return evaluate_dataset(evaluator, test.x, test.y)

    with Broker(prefer=config.broker) as broker:
        federation = f"run-{uuid.uuid4().hex[:8]}"
        run_dir = config.out_dir / federation
        # 2. devices: one process for a small fleet, worker processes for a large one
        in_process = fleet.devices <= DEVICES_PER_PROCESS
        devices: list = []
        if in_process:
            with console.status(f"preparing {fleet.devices} emulated devices"):
                devices = build_fleet(fleet, broker.host, broker.port, federation, artifacts,
                                      run_dir / "devices", broker.mqtt_version)
        result = FederationResult(broker.kind, test.source)
        console.print(
            f"broker: [bold]{broker.kind}[/] on {broker.host}:{broker.port}; data: "
            f"{test.source}; {fleet.devices} devices ({', '.join(fleet.backends)}), Dirichlet "
            f"alpha={fleet.alpha}, dropout {fleet.dropout}, link loss {fleet.connection_loss}")
        train = TrainConfig(config.local_steps, config.learning_rate, config.update_encoding,
                            config.update_topk)
        global_bytes = len(encode_global(GlobalModel(federation, 0, manifest.sha256, initial,
                                                     train)))
        loss0, acc0 = score(initial)
        result.rows.append(RoundRow(0, acc0, loss0, 0, 0, 0, 0.0))

        progress = Progress(TextColumn("[bold]federation"), BarColumn(),
                            TextColumn("round {task.completed}/{task.total}"),
                            TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=console)
        task = progress.add_task("rounds", total=config.rounds, acc=f"accuracy {acc0:.3f}")
        started = time.monotonic()

        def on_round(record: RoundRecord, adapter: TensorDict) -> None:
            loss, acc = score(adapter)
            result.rows.append(RoundRow(
                record.round + 1, acc, loss, len(record.devices), record.bytes_received,
                global_bytes * fleet.devices, time.monotonic() - started))
            progress.update(task, advance=1, acc=f"accuracy {acc:.3f}, "
                                                 f"{len(record.devices)} devices")

        # 3. aggregator: persistent session + manual acks, as on a gateway
        agg_config = AggregatorConfig(
            federation=federation, rounds=config.rounds,
            clients_per_round=max(1, round(config.participation * fleet.devices)),
            min_clients=max(1, round(config.quorum * fleet.devices)),
            round_deadline_s=config.deadline_s, train=train, mode=config.mode,
            strategy=config.strategy,
        )
        agg_transport = MqttTransport(broker.host, broker.port, f"aggregator-{federation}",
                                      persistent_session=True, manual_ack=True,
                                      mqtt_version=broker.mqtt_version)
        agg_transport.start()
        coordinator = Coordinator(agg_config, manifest, initial, agg_transport,
                                  GlobalStore(run_dir / "aggregator"), on_round=on_round)
        stop = threading.Event()
        with progress:
            if in_process:
                threads = start_fleet(devices, stop)
            else:
                workers = FleetProcesses(fleet, broker.host, broker.port, federation, artifacts,
                                         run_dir / "devices", broker.mqtt_version)
            try:
                coordinator.run()
            finally:
                stop.set()
                if in_process:
                    for thread in threads:
                        thread.join(timeout=30)
                    result.skipped_rounds = sum(d.rounds_skipped for d in devices)
                    result.links_lost = sum(d.links_lost for d in devices)
                else:
                    result.skipped_rounds, result.links_lost = workers.finish()
                agg_transport.stop()

    result.rejections = dict(coordinator.rejections)
    _print_summary(console, result, fleet.devices)
    (run_dir / "results.json").write_text(json.dumps({
        "broker": result.broker, "data": result.data_source,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "rounds": [asdict(r) for r in result.rows], "rejections": result.rejections,
        "skipped_rounds": result.skipped_rounds, "links_lost": result.links_lost,
    }, indent=1))
    console.print(f"results written to {run_dir / 'results.json'}")
    return result


def _print_summary(console: Console, result: FederationResult, fleet_size: int) -> None:
    table = Table(title=f"Federated LoRA fine-tuning on Fashion-MNIST, {fleet_size} devices")
    for column in ("round", "test accuracy", "test loss", "devices", "bytes up", "bytes down",
                   "elapsed s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(str(row.round), f"{row.accuracy:.3f}", f"{row.loss:.3f}", str(row.devices),
                      f"{row.bytes_up:,}", f"{row.bytes_down:,}", f"{row.seconds:.1f}")
    console.print(table)
    if result.rejections:
        console.print(f"rejected updates: {result.rejections}")
    if result.skipped_rounds or result.links_lost:
        console.print(f"device rounds sat out: {result.skipped_rounds}; "
                      f"links lost: {result.links_lost}")
    verdict = "rose" if result.improved else "did NOT rise"
    console.print(f"accuracy {verdict}: {result.rows[0].accuracy:.3f} -> "
                  f"{result.rows[-1].accuracy:.3f}")
