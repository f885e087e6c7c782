"""Run a whole federation in one process: broker, aggregator and an emulated fleet of devices.

`edgefl demo` is a small mixed ExecuTorch / ONNX Runtime fleet; `edgefl emulate` is the same
machinery with hundreds to thousands of devices and unreliable behaviour.
"""

from __future__ import annotations

import json
import logging
import sys
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
from aggregator.exact import lora_layers, residual_ratio
from aggregator.native_workers import check_native, command, write_spec
from aggregator.registry import RESIDUAL_STRATEGIES, STRATEGY_NAMES, check_mergeable
from aggregator.store import GlobalStore
from aggregator.workers import MergingLeader, Supervisor
from edge_client.fleet import (
    DEVICES_PER_PROCESS,
    FleetConfig,
    FleetProcesses,
    NativeFleet,
    build_fleet,
    fleet_task_kinds,
    start_fleet,
)
from edge_client.native_logs import native_stderr_silenced
from edge_client.trainer import Trainer, evaluate_dataset, make_trainer
from edgefl.device_scores import device_accuracy
from edgefl.report import write_report
from export.build import build_artifacts
from protocol.manifest import load_manifest
from protocol.messages import TrainConfig
from protocol.residual import dense_residual
from protocol.tensors import TensorDict
from transport.broker import Broker
from transport.mqtt import MqttTransport
from workloads.base import WorkloadData, capability
from workloads.data import Dataset
from workloads.registry import get_workload_data

logger = logging.getLogger(__name__)

FLTAC_STRATEGY = "fltac"  # its fleets hold two tasks per device, scored per task slot


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
    eval_size: int | None = None  # test examples scored each round (None: the workload's)
    workload: str = "fmnist-cnn"  # any of workloads.WORKLOAD_NAMES
    out_dir: Path = Path("runs/demo")
    broker: str = "mosquitto"  # or "amqtt" to force the embedded broker
    num_clusters: int = 2  # fltac: K (the fleet's devices then hold two tasks each)
    # fed-talora (or any strategy, for a continual baseline): classes of each task, in order
    task_schedule: tuple[tuple[int, ...], ...] = ()
    rounds_per_task: int = 1
    # >0: the aggregator as a leader and this many worker processes on a shared subscription
    # (edgefl aggregator --workers; docs/DEPLOY.md section 6.1)
    aggregator_workers: int = 0
    aggregator_worker_kind: str = "python"  # or "native": edgefl-ingest (--worker-kind native)

    def __post_init__(self) -> None:
        # The aggregator's own checks (strategy, clusters, schedule, mode), before any work.
        checked = AggregatorConfig(rounds=self.rounds, strategy=self.strategy, mode=self.mode,
                                   num_clusters=self.num_clusters,
                                   task_schedule=self.task_schedule,
                                   rounds_per_task=self.rounds_per_task)
        if self.aggregator_workers < 0:
            raise ValueError(f"aggregator workers must be 0 or more, "
                             f"got {self.aggregator_workers}")
        if self.aggregator_workers:
            check_mergeable(checked, "--aggregator-workers")
        if self.aggregator_worker_kind not in ("python", "native"):
            raise ValueError(f"aggregator worker kind must be python or native, "
                             f"got {self.aggregator_worker_kind!r}")
        if self.aggregator_worker_kind == "native":
            if not self.aggregator_workers:
                raise ValueError("--aggregator-worker-kind native needs --aggregator-workers N")
            check_native(checked, option="--aggregator-worker-kind")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from "
                             f"{', '.join(STRATEGY_NAMES)}")
        if self.strategy == FLTAC_STRATEGY and not self.fleet.multitask:
            raise ValueError("fltac needs a multi-task fleet (FleetConfig.multitask)")
        # What the workload's data must offer, before anything is exported or started.
        data = get_workload_data(self.workload)
        if self.fleet.multitask:
            capability(data, "task_labellings")
        if self.task_schedule:
            capability(data, "incremental_tasks")


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
    # FL-TAC: the last scoring's accuracy of every task slot on its own task
    slot_accuracy: dict[str, float] = field(default_factory=dict)
    # device id -> its final model's accuracy on its own label mix (edgefl.device_scores)
    device_accuracy: dict[str, float | None] = field(default_factory=dict)
    # FL-TAC: the final slot -> cluster assignment
    assignment: dict[str, int] = field(default_factory=dict)
    # exact aggregation: ‖R‖ / ‖s·B̄Ā‖ of the final global (what FedAvg would have dropped)
    residual_ratio: float | None = None
    # a task schedule: the final model's accuracy on each trained task's classes (forgetting)
    task_accuracy: list[float] = field(default_factory=list)
    native_failures: int = 0  # native devices that exited with an error
    worker_restarts: int = 0  # aggregator worker processes restarted after dying

    @property
    def improved(self) -> bool:
        """Whether the final global adapter beats the initial one."""
        return len(self.rows) > 1 and self.rows[-1].accuracy > self.rows[0].accuracy


def run_federation(config: FederationConfig, console: Console | None = None) -> FederationResult:
    """Run the federation to its last round and print the per-round table."""
    console = console or Console()
    fleet = config.fleet
    # 1. artifacts: built once, then reused from the cache
    # ONNX Runtime's artifact generation prints its graph passes from C++ (the first run only).
    with console.status(f"exporting {config.workload}'s training programs (cached after)"), \
            native_stderr_silenced():
        artifacts = build_artifacts(config.workload)
    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    data = get_workload_data(config.workload)
    test = data.test_data(config.eval_size or data.eval_size)
    evaluator = make_trainer("onnxruntime", artifacts)  # fastest backend for scoring globals
    coordinator: Coordinator | None = None  # set below; scoring reads its residual and clusters
    truth = (fleet_task_kinds(fleet, config.workload) if config.strategy == FLTAC_STRATEGY
             else {})

    def score(adapter: TensorDict) -> tuple[float, float]:
        if coordinator is None or not (coordinator.state.clusters or coordinator.state.residual
                                       or config.task_schedule):
            evaluator.set_adapter(adapter)
            return evaluate_dataset(evaluator, test.x, test.y)
        loss, accuracy, result.slot_accuracy = _score_special(config, coordinator, evaluator,
                                                              data, test, truth)
        return loss, accuracy

    with Broker(prefer=config.broker) as broker:
        federation = f"run-{uuid.uuid4().hex[:8]}"
        run_dir = config.out_dir / federation
        # 2. devices: one process for a small fleet, worker processes for a large one
        in_process = fleet.python_devices <= DEVICES_PER_PROCESS
        devices: list = []
        if in_process:
            with console.status(f"preparing {fleet.devices} emulated devices"):
                devices = build_fleet(fleet, broker.host, broker.port, federation, artifacts,
                                      run_dir / "devices", broker.mqtt_version)
        result = FederationResult(broker.kind, test.source)
        console.print(
            f"broker: [bold]{broker.kind}[/] on {broker.host}:{broker.port}; data: "
            f"{test.source}; {fleet.devices} devices ({', '.join(fleet.backends)}"
            f"{f', {fleet.native} native' if fleet.native else ''}), Dirichlet "
            f"alpha={fleet.alpha}, dropout {fleet.dropout}, link loss {fleet.connection_loss}")
        train = TrainConfig(config.local_steps, config.learning_rate, config.update_encoding,
                            config.update_topk)
        # FL-TAC counts (device, task) slots: each multi-task device sends two updates a round
        slots, unit = (2, "task slots") if fleet.multitask else (1, "devices")
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
                record.global_bytes * fleet.devices, time.monotonic() - started))
            progress.update(task, advance=1, acc=f"accuracy {acc:.3f}, "
                                                 f"{len(record.devices)} {unit}")

        # 3. aggregator: persistent session + manual acks, as on a gateway
        agg_config = AggregatorConfig(
            federation=federation, rounds=config.rounds,
            clients_per_round=max(1, round(config.participation * fleet.devices * slots)),
            min_clients=max(1, round(config.quorum * fleet.devices * slots)),
            round_deadline_s=config.deadline_s, train=train, mode=config.mode,
            strategy=config.strategy, num_clusters=config.num_clusters,
            task_schedule=config.task_schedule, rounds_per_task=config.rounds_per_task,
        )
        leader = "-leader" if config.aggregator_workers else ""
        agg_transport = MqttTransport(broker.host, broker.port, f"aggregator-{federation}{leader}",
                                      persistent_session=True, manual_ack=True,
                                      mqtt_version=broker.mqtt_version)
        agg_transport.start()
        # The CLI keeps a federation's state in <state dir>/<federation>: so do we, for workers.
        store = GlobalStore(run_dir / "aggregator" / federation)
        supervisor = None
        if config.aggregator_workers:
            coordinator = MergingLeader(agg_config, manifest, initial, agg_transport, store,
                                        on_round=on_round, workers=config.aggregator_workers,
                                        worker_kind=config.aggregator_worker_kind)
            native = config.aggregator_worker_kind == "native"
            supervisor = Supervisor(
                lambda k: (command(write_spec(store.folder, k, agg_config, manifest, broker.host,
                                              broker.port)) if native
                           else _worker_command(agg_config, artifacts, broker, run_dir, k)),
                config.aggregator_workers)
            supervisor.start()
        else:
            coordinator = Coordinator(agg_config, manifest, initial, agg_transport, store,
                                      on_round=on_round)

        stop = threading.Event()
        with progress:
            native = (NativeFleet(fleet, broker.host, broker.port, federation, artifacts,
                                  run_dir / "devices") if fleet.native else None)
            if in_process:
                threads = start_fleet(devices, stop)
            else:
                workers = FleetProcesses(fleet, broker.host, broker.port, federation, artifacts,
                                         run_dir / "devices", broker.mqtt_version)
            try:
                # The supervisor's poll is the run loop's stop check (it never asks to stop).
                coordinator.run(supervisor.poll if supervisor is not None else lambda: False)
            finally:
                if supervisor is not None:
                    supervisor.stop()
                    result.worker_restarts = supervisor.restarts
                stop.set()
                if in_process:
                    for thread in threads:
                        thread.join(timeout=30)
                    result.skipped_rounds = sum(d.rounds_skipped for d in devices)
                    result.links_lost = sum(d.links_lost for d in devices)
                else:
                    result.skipped_rounds, result.links_lost = workers.finish()
                if native is not None:
                    result.native_failures = native.finish()
                agg_transport.stop()

    result.rejections = dict(coordinator.rejections)
    if isinstance(coordinator, MergingLeader):  # the updates were the workers' to judge
        result.rejections = dict(coordinator.worker_rejections() + coordinator.rejections)
    with console.status("scoring every device's final model"):
        state = coordinator.state
        result.device_accuracy = device_accuracy(
            evaluator, data, fleet, state.adapter, state.clusters, state.assignment,
            state.residual, run_dir / "devices", test, _seen_classes(config, coordinator))
        result.assignment = dict(state.assignment)
        if state.residual:
            scaling = {layer: manifest.lora_scaling(layer) for layer in lora_layers(state.adapter)}
            result.residual_ratio = residual_ratio(dense_residual(state.residual), state.adapter,
                                                   scaling)
        if config.task_schedule:
            result.task_accuracy = _task_accuracy(config, coordinator, evaluator, test)
    _print_summary(console, result, config.workload, fleet.devices, _measure(config))
    (run_dir / "results.json").write_text(json.dumps({
        "broker": result.broker, "data": result.data_source,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "rounds": [asdict(r) for r in result.rows], "rejections": result.rejections,
        "skipped_rounds": result.skipped_rounds, "links_lost": result.links_lost,
        "native_failures": result.native_failures,
        "aggregator_workers": config.aggregator_workers,
        "aggregator_worker_kind": config.aggregator_worker_kind,
        "worker_restarts": result.worker_restarts,
        "device_accuracy": result.device_accuracy, "residual_ratio": result.residual_ratio,
        "task_accuracy": result.task_accuracy,
    }, indent=1))
    report = write_report(run_dir / "results.json")
    console.print(f"results written to {run_dir / 'results.json'}; charts in {report}")
    return result


def _worker_command(config: AggregatorConfig, artifacts: Path, broker: Broker, run_dir: Path,
                    index: int) -> list[str]:
    """`edgefl aggregator --worker-index k` for the run's federation and state."""
    return [sys.executable, "-m", "edgefl", "aggregator", "--host", broker.host,
            "--port", str(broker.port), "--federation", config.federation,
            "--artifacts", str(artifacts), "--state-dir", str(run_dir / "aggregator"),
            "--rounds", str(config.rounds), "--clients-per-round", str(config.clients_per_round),
            "--min-clients", str(config.min_clients), "--deadline", str(config.round_deadline_s),
            "--strategy", config.strategy, "--mode", config.mode,
            "--worker-index", str(index)]


def _score_special(config: FederationConfig, coordinator: Coordinator, evaluator: Trainer,
                   data: WorkloadData, test: Dataset, truth: dict[str, str],
                   ) -> tuple[float, float, dict[str, float]]:
    """Loss and accuracy of what the devices would use, for FL-TAC / residual / continual runs.

    The dict holds FL-TAC's accuracy per task slot (empty otherwise).

    FL-TAC: the mean over the last assignment's slots of their cluster adapter on their own
    task (this demo knows each slot's task; the aggregator does not). Residual strategies:
    the global with its residual folded into the frozen weights. A task schedule: accuracy
    over the classes seen so far, predicted among those classes (no task id).
    """
    state = coordinator.state
    if state.clusters:
        scores: dict[tuple[int, str], tuple[float, float]] = {}
        for slot, cluster in state.assignment.items():
            key = (cluster, truth[slot])
            if key not in scores:
                evaluator.set_adapter(state.clusters[cluster])
                task_test = data.task_test_data(truth[slot], len(test))  # type: ignore[attr-defined]
                scores[key] = evaluate_dataset(evaluator, task_test.x, task_test.y)
        per_slot = {s: scores[(c, truth[s])] for s, c in state.assignment.items()}
        return (float(np.mean([x[0] for x in per_slot.values()])),
                float(np.mean([x[1] for x in per_slot.values()])),
                {s: x[1] for s, x in per_slot.items()})
    evaluator.set_base_delta(dense_residual(state.residual))
    evaluator.set_adapter(state.adapter)
    seen = _seen_classes(config, coordinator)
    if seen is None:
        return (*evaluate_dataset(evaluator, test.x, test.y), {})
    keep = np.isin(test.y, seen)
    evaluator.set_class_mask(seen)
    try:
        return (*evaluate_dataset(evaluator, test.x[keep], test.y[keep]), {})
    finally:
        evaluator.set_class_mask(None)


def _task_accuracy(config: FederationConfig, coordinator: Coordinator, evaluator: Trainer,
                   test: Dataset) -> list[float]:
    """Accuracy on each trained task's classes, predicted among all classes seen (no task id)."""
    seen = _seen_classes(config, coordinator) or []
    state = coordinator.state
    if state.residual:
        evaluator.set_base_delta(dense_residual(state.residual))
    evaluator.set_adapter(state.adapter)
    evaluator.set_class_mask(seen)
    try:
        scores = []
        for task in config.task_schedule:
            if not set(task) <= set(seen):
                break
            keep = np.isin(test.y, task)
            scores.append(evaluate_dataset(evaluator, test.x[keep], test.y[keep])[1])
        return scores
    finally:
        evaluator.set_class_mask(None)  # (each scoring sets the residual it needs itself)


def _seen_classes(config: FederationConfig, coordinator: Coordinator) -> list[int] | None:
    """A class-incremental run's classes of the tasks trained so far (None: not such a run)."""
    if not config.task_schedule:
        return None
    # coordinator.round is the next round: the tasks trained so far end one round earlier
    last_task, _ = coordinator.config.task_at(max(coordinator.round - 1, 0))
    return sorted({c for task in config.task_schedule[: (last_task or 0) + 1] for c in task})


def _measure(config: FederationConfig) -> str:
    """What the accuracy column measures for this run's strategy."""
    if config.strategy == FLTAC_STRATEGY:
        return ("accuracy: each task slot's cluster adapter on its own task's held-out test set, "
                "averaged over slots; 'devices' counts task slots")
    if config.task_schedule:
        return ("accuracy: over the classes of the tasks seen so far, predicted among them "
                "(no task id)" + (", residual folded into the frozen weights"
                                  if config.strategy in RESIDUAL_STRATEGIES else ""))
    if config.strategy in RESIDUAL_STRATEGIES:
        return "accuracy: the global adapter with its residual folded into the frozen weights"
    return "accuracy: the global adapter on the workload's held-out test set"


def _print_summary(console: Console, result: FederationResult, workload: str, fleet_size: int,
                   measure: str) -> None:
    table = Table(title=f"Federated LoRA fine-tuning of {workload} on {result.data_source}, "
                        f"{fleet_size} devices")
    for column in ("round", "test accuracy", "test loss", "devices", "bytes up", "bytes down",
                   "elapsed s"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(str(row.round), f"{row.accuracy:.3f}", f"{row.loss:.3f}", str(row.devices),
                      f"{row.bytes_up:,}", f"{row.bytes_down:,}", f"{row.seconds:.1f}")
    console.print(table)
    console.print(measure)
    # A device resends its update on every copy of the open round's global (the aggregator
    # republishes it during long rounds); those copies are ignored, not refused updates.
    refused = {reason: n for reason, n in result.rejections.items() if reason != "duplicate"}
    if refused:
        console.print(f"rejected updates: {refused}")
    if result.rejections.get("duplicate"):
        console.print(f"resent copies of counted updates, ignored: "
                      f"{result.rejections['duplicate']}")
    if result.skipped_rounds or result.links_lost:
        console.print(f"device rounds sat out: {result.skipped_rounds}; "
                      f"links lost: {result.links_lost}")
    scored = [v for v in result.device_accuracy.values() if v is not None]
    if scored:
        console.print(f"per-device accuracy (each device's final model on its own label mix): "
                      f"mean {np.mean(scored):.3f}, worst {min(scored):.3f} over {len(scored)} "
                      "devices")
    verdict = "rose" if result.improved else "did NOT rise"
    console.print(f"accuracy {verdict}: {result.rows[0].accuracy:.3f} -> "
                  f"{result.rows[-1].accuracy:.3f}")
