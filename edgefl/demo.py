"""The demo federation: broker, aggregator and emulated devices on non-IID Fashion-MNIST."""

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
from edge_client.agent import DeviceAgent, device_seed
from edge_client.data import device_partitions
from edge_client.trainer import evaluate_dataset, make_trainer
from export.build import ADAPTER_INIT_FILE, build_artifacts
from protocol.codec import encode_global
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, TrainConfig
from protocol.tensors import TensorDict
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads import fmnist

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Demo knobs; the defaults finish in a few minutes on 2 cores."""

    devices: int = 6
    rounds: int = 6
    local_steps: int = 20
    learning_rate: float = 0.05
    alpha: float = 0.5
    backends: tuple[str, ...] = ("executorch", "onnxruntime")
    eval_size: int = 2000
    seed: int = 0
    out_dir: Path = Path("runs/demo")
    broker: str = "mosquitto"  # or "amqtt" to force the embedded broker


@dataclass
class RoundRow:
    """One line of the demo's per-round table."""

    round: int
    accuracy: float
    loss: float
    devices: int
    bytes_up: int
    bytes_down: int
    seconds: float


@dataclass
class DemoResult:
    """Everything the demo measured; also written to results.json."""

    broker: str
    data_source: str
    rows: list[RoundRow] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        """Whether the final global adapter beats the initial one."""
        return len(self.rows) > 1 and self.rows[-1].accuracy > self.rows[0].accuracy


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the whole federation in this process (devices and aggregator on their own threads)."""
    console = console or Console()
    # 1. artifacts: built once, then reused from the cache
    with console.status("exporting the CNN training programs (cached after the first run)"):
        artifacts = build_artifacts("fmnist-cnn")
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / ADAPTER_INIT_FILE))

    # 2. data: each device gets a Dirichlet(alpha) share of the private training data
    private, parts = device_partitions(config.devices, config.alpha, config.seed)
    test = fmnist.load("t10k")
    test = test.subset(np.arange(min(config.eval_size, len(test))))
    evaluator = make_trainer("onnxruntime", artifacts)  # fastest backend for scoring the globals

    def accuracy_of(adapter: TensorDict) -> tuple[float, float]:
        evaluator.set_adapter(adapter)
        return evaluate_dataset(evaluator, test.x, test.y)

    with Broker(prefer=config.broker) as broker:
        console.print(f"broker: [bold]{broker.kind}[/] on {broker.host}:{broker.port}; "
                      f"data: {private.source}, {config.devices} devices, Dirichlet "
                      f"alpha={config.alpha}, backends {', '.join(config.backends)}")
        result = DemoResult(broker.kind, private.source)
        federation = f"demo-{uuid.uuid4().hex[:8]}"
        train = TrainConfig(config.local_steps, config.learning_rate)
        global_bytes = len(encode_global(GlobalModel(federation, 0, manifest.sha256, initial, train)))
        loss0, acc0 = accuracy_of(initial)
        result.rows.append(RoundRow(0, acc0, loss0, 0, 0, 0, 0.0))

        progress = Progress(TextColumn("[bold]federation"), BarColumn(),
                            TextColumn("round {task.completed}/{task.total}"),
                            TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=console)
        task = progress.add_task("rounds", total=config.rounds, acc=f"accuracy {acc0:.3f}")
        started = time.monotonic()

        def on_round(record: RoundRecord, adapter: TensorDict) -> None:
            loss, acc = accuracy_of(adapter)
            result.rows.append(RoundRow(
                record.round + 1, acc, loss, len(record.devices), record.bytes_received,
                global_bytes * config.devices, time.monotonic() - started,
            ))
            progress.update(task, advance=1, acc=f"accuracy {acc:.3f}")

        # 3. aggregator
        agg_config = AggregatorConfig(
            federation=federation, rounds=config.rounds, clients_per_round=config.devices,
            min_clients=max(1, config.devices // 2), round_deadline_s=300.0, train=train,
        )
        run_dir = config.out_dir / federation
        agg_transport = MqttTransport(broker.host, broker.port, f"aggregator-{federation}",
                                      persistent_session=True, manual_ack=True,
                                      mqtt_version=broker.mqtt_version)
        agg_transport.start()
        coordinator = Coordinator(agg_config, manifest, initial, agg_transport,
                                  GlobalStore(run_dir / "aggregator"), on_round=on_round)

        # 4. devices, each with its own MQTT connection and training program
        agents = []
        for i in range(config.devices):
            device_id = f"device-{i:03d}"
            data = private.subset(parts[i])
            backend = config.backends[i % len(config.backends)]
            transport = MqttTransport(
                broker.host, broker.port, f"{federation}-{device_id}",
                will=DeviceAgent.will(federation, device_id), mqtt_version=broker.mqtt_version,
            )
            agents.append(DeviceAgent(
                device_id, federation, make_trainer(backend, artifacts, config.learning_rate),
                data.x, data.y, transport, run_dir / "devices", seed=device_seed(device_id),
            ))
        threads = [threading.Thread(target=a.run, name=a.device_id, daemon=True) for a in agents]
        with progress:
            for thread in threads:
                thread.start()
            coordinator.run()
            for thread in threads:
                thread.join(timeout=60)
        agg_transport.stop()

    _print_summary(console, result, coordinator.rejections)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(
        {"broker": result.broker, "data": result.data_source, "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
         "rounds": [asdict(r) for r in result.rows]}, indent=1))
    console.print(f"results written to {run_dir / 'results.json'}")
    return result


def _print_summary(console: Console, result: DemoResult, rejections: dict[str, int]) -> None:
    table = Table(title="Federated LoRA fine-tuning of the CNN on Fashion-MNIST (global model)")
    for column in ("round", "test accuracy", "test loss", "devices", "bytes up", "bytes down",
                   "elapsed s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(str(row.round), f"{row.accuracy:.3f}", f"{row.loss:.3f}", str(row.devices),
                      f"{row.bytes_up:,}", f"{row.bytes_down:,}", f"{row.seconds:.1f}")
    console.print(table)
    if rejections:
        console.print(f"rejected updates: {dict(rejections)}")
    verdict = "rose" if result.improved else "did NOT rise"
    console.print(f"accuracy {verdict}: {result.rows[0].accuracy:.3f} -> "
                  f"{result.rows[-1].accuracy:.3f}")
