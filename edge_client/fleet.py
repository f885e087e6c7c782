"""Emulated fleets: many devices per process, each with its own MQTT connection and behaviour.

Devices of one backend share one training program (a lock serialises them), so a thousand
devices cost a thousand connections and data shares, not a thousand copies of the model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.agent import DeviceAgent, device_seed
from edge_client.data import LocalTask, multitask_tasks
from edge_client.trainer import Trainer, make_trainer
from protocol.manifest import load_manifest
from protocol.messages import GlobalModel, Update, slot_key
from transport.mqtt import MqttTransport
from workloads.base import WorkloadData
from workloads.registry import get_workload_data

logger = logging.getLogger(__name__)

CONNECT_BATCH = 50  # connections opened between short pauses, so the broker is not stormed
# paho's network loop uses select(), which fails for file descriptors above 1024, and each
# client holds about three (its socket and a wake-up pair): one process keeps <= 250 devices.
DEVICES_PER_PROCESS = 250


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """How many devices, which backends, and how unreliable they are."""

    devices: int = 100
    backends: tuple[str, ...] = ("onnxruntime",)
    alpha: float = 0.5
    seed: int = 0
    slowdown: tuple[float, float] = (1.0, 1.0)  # per-device compute slowdown, drawn uniformly
    dropout: float = 0.0  # chance a device sits a round out
    connection_loss: float = 0.0  # chance a device loses its link before sending an update
    multitask: bool = False  # FL-TAC: each device holds one local task per task of the workload
    native: int = 0  # the fleet's last `native` devices run edge_client/native's C++ device

    def __post_init__(self) -> None:
        if self.devices <= 0:
            raise ValueError("devices must be positive")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.connection_loss < 1.0):
            raise ValueError("dropout and connection_loss are probabilities in [0, 1)")
        if not 1.0 <= self.slowdown[0] <= self.slowdown[1]:
            raise ValueError("slowdown must be a range (lo, hi) with 1 <= lo <= hi")
        if not 0 <= self.native <= self.devices:
            raise ValueError(f"native must be in 0..devices ({self.devices}), got {self.native}")

    @property
    def python_devices(self) -> int:
        """Devices run by Python agents: indices 0 .. python_devices - 1."""
        return self.devices - self.native


class EmulatedDevice(DeviceAgent):
    """A DeviceAgent with a shared trainer, a compute speed, dropouts and link losses."""

    def __init__(self, *args: object, lock: threading.Lock, slowdown: float, dropout: float,
                 connection_loss: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lock, self.slowdown = lock, slowdown
        self.dropout, self.connection_loss = dropout, connection_loss
        self.rounds_skipped = 0
        self.links_lost = 0

    def handle_global(self, message: GlobalModel) -> list[Update]:
        """Maybe sit out; else train on the shared program, then take `slowdown` times as long."""
        if message.final or message.round <= self.state.last_round:
            return []
        if self.rng.random() < self.dropout:
            self.state.last_round = message.round
            self.rounds_skipped += 1
            return []
        with self.lock:
            started = time.monotonic()
            updates = super().handle_global(message)
            elapsed = time.monotonic() - started
        if self.slowdown > 1.0:  # outside the lock: other devices use the program meanwhile
            time.sleep(elapsed * (self.slowdown - 1.0))
        if updates and self.rng.random() < self.connection_loss:
            self.links_lost += 1
            self.transport.drop_connection()  # type: ignore[attr-defined]
        return updates


def fleet_device_id(index: int) -> str:
    """Device id of the fleet's device number `index`."""
    return f"dev-{index:05d}"


def device_tasks(config: FleetConfig, data: WorkloadData, index: int) -> dict[str, LocalTask]:
    """A multi-task device's local tasks, keyed by their true task."""
    return multitask_tasks(data, index, config.devices, config.alpha, config.seed,
                           slot_seed=device_seed(fleet_device_id(index)) ^ config.seed)


def fleet_task_kinds(config: FleetConfig, workload: str) -> dict[str, str]:
    """Slot -> true task (type or group; topic or language) of every slot of a multi-task fleet.

    For scoring only: the aggregator is never told which task a slot serves.
    """
    data = get_workload_data(workload)
    kinds = {}
    for i in range(config.devices):
        kinds |= {slot_key(fleet_device_id(i), task.name): kind
                  for kind, task in device_tasks(config, data, i).items()}
    return kinds


def build_fleet(config: FleetConfig, host: str, port: int, federation: str, artifacts: Path,
                state_dir: Path | None = None, mqtt_version: int = 5,
                indices: range | None = None) -> list[EmulatedDevice]:
    """Create devices `indices` of the fleet (not yet connected): data, trainers, behaviours.

    The devices hold shares of the data of the workload the artifacts were exported for.

    Every process computes the same split from the seed, so slices built in different worker
    processes never overlap.
    """
    workload = get_workload_data(load_manifest(artifacts).workload)
    # Drawn for the whole fleet, so a device's slowdown does not depend on the slice it is in.
    slowdowns = np.random.default_rng(config.seed).uniform(*config.slowdown, size=config.devices)
    trainers: dict[str, tuple[Trainer, threading.Lock]] = {
        b: (make_trainer(b, artifacts), threading.Lock()) for b in config.backends
    }
    devices = []
    for i in indices if indices is not None else range(config.python_devices):
        device_id = fleet_device_id(i)
        trainer, lock = trainers[config.backends[i % len(config.backends)]]
        transport = MqttTransport(host, port, f"{federation}-{device_id}",
                                  will=DeviceAgent.will(federation, device_id),
                                  mqtt_version=mqtt_version)
        seed = device_seed(device_id) ^ config.seed
        tasks = device_data(config, workload, i)
        data = ({"inputs": None, "labels": None, "tasks": tasks} if config.multitask
                else {"inputs": tasks[0].inputs, "labels": tasks[0].labels})
        devices.append(EmulatedDevice(
            device_id, federation, trainer, transport=transport, state_dir=state_dir, seed=seed,
            lock=lock, slowdown=float(slowdowns[i]), dropout=config.dropout,
            connection_loss=config.connection_loss, **data,
        ))
    return devices


def start_fleet(devices: list[EmulatedDevice], stop: threading.Event) -> list[threading.Thread]:
    """Start every device on its own thread, opening connections in small batches."""
    threads = []
    for i, device in enumerate(devices):
        thread = threading.Thread(target=device.run, args=(stop,), name=device.device_id,
                                  daemon=True)
        thread.start()
        threads.append(thread)
        if (i + 1) % CONNECT_BATCH == 0:
            time.sleep(0.05)
    return threads


def run_fleet_slice(config: FleetConfig, host: str, port: int, federation: str, artifacts: Path,
                    state_dir: Path | None, mqtt_version: int, indices: range,
                    stop: threading.Event) -> tuple[int, int]:
    """Build, start and wait for one slice of the fleet; return (rounds sat out, links lost).

    This is the body of each worker process of a large fleet.
    """
    devices = build_fleet(config, host, port, federation, artifacts, state_dir, mqtt_version,
                          indices)
    threads = start_fleet(devices, stop)
    for thread in threads:
        thread.join()
    return sum(d.rounds_skipped for d in devices), sum(d.links_lost for d in devices)


def _worker(args: tuple, stop: object, results: object) -> None:  # noqa: ANN001
    # Simulated link losses make every worker chatty; the parent prints the summary.
    logging.basicConfig(level=logging.ERROR)
    results.put(run_fleet_slice(*args, stop=stop))  # type: ignore[attr-defined]


class FleetProcesses:
    """A large fleet spread over worker processes of at most DEVICES_PER_PROCESS devices."""

    def __init__(self, config: FleetConfig, host: str, port: int, federation: str,
                 artifacts: Path, state_dir: Path | None, mqtt_version: int) -> None:
        import multiprocessing

        # spawn, not fork: the parent runs threads (paho, the aggregator) that fork would copy
        # in whatever state they were.
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.results = context.Queue()
        self.processes = []
        for start in range(0, config.python_devices, DEVICES_PER_PROCESS):
            indices = range(start, min(start + DEVICES_PER_PROCESS, config.python_devices))
            args = (config, host, port, federation, artifacts, state_dir, mqtt_version, indices)
            process = context.Process(target=_worker, args=(args, self.stop, self.results),
                                      name=f"fleet-{start}", daemon=True)
            process.start()
            self.processes.append(process)

    def finish(self, timeout_s: float = 60.0) -> tuple[int, int]:
        """Signal stop, wait for the workers, and sum their (rounds sat out, links lost)."""
        self.stop.set()
        skipped = lost = 0
        for _ in self.processes:
            try:
                worker_skipped, worker_lost = self.results.get(timeout=timeout_s)
            except Exception:  # a worker that died reports nothing; the rest still count
                continue
            skipped, lost = skipped + worker_skipped, lost + worker_lost
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
        return skipped, lost


def device_data(config: FleetConfig, workload: WorkloadData, index: int) -> list[LocalTask]:
    """Device `index`'s local task(s), exactly as build_fleet gives its Python agent."""
    if config.multitask:
        return list(device_tasks(config, workload, index).values())
    share = workload.device_data(index, config.devices, config.alpha, config.seed)
    return [LocalTask("", share.x, share.y)]


# Up to this many native devices run as one `edgefl-device` process each, as real devices do;
# more run in `edgefl-fleet` processes of NATIVE_PER_PROCESS devices sharing one program.
# libmosquitto's network loop uses select(), which fails for file descriptors above 1024, and
# each client holds three (its socket and a wake-up pair).
NATIVE_SEPARATE = 32
NATIVE_PER_PROCESS = 300


class NativeFleet:
    """The fleet's native devices (edge_client/native), as `edgefl-device` or `edgefl-fleet`
    processes.

    Each gets the same data a Python agent of its index would train on, as a partition file;
    logs go to `<state_dir>/<id>.log` (or `fleet-<first>.log`). Slowdown, dropout and link loss
    are Python-only.
    """

    def __init__(self, config: FleetConfig, host: str, port: int, federation: str,
                 artifacts: Path, state_dir: Path) -> None:
        import subprocess

        from edge_client.native import EXECUTABLE, build_native, write_partition

        build_native()
        workload = get_workload_data(load_manifest(artifacts).workload)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        indices = range(config.python_devices, config.devices)
        # edgefl-fleet finds each device's file by this name in --data-dir
        partitions = {i: write_partition(state_dir / f"{fleet_device_id(i)}.data.safetensors",
                                         device_data(config, workload, i)) for i in indices}
        common = ["--federation", federation, "--artifacts", str(artifacts), "--host", host,
                  "--port", str(port), "--state-dir", str(state_dir)]
        if len(indices) <= NATIVE_SEPARATE:
            for i in indices:
                device_id = fleet_device_id(i)
                self._start(state_dir / f"{device_id}.log", [
                    str(EXECUTABLE), "--id", device_id, "--data", str(partitions[i]),
                    "--seed", str(device_seed(device_id) ^ config.seed), *common])
            return
        for first in range(indices.start, indices.stop, NATIVE_PER_PROCESS):
            count = min(NATIVE_PER_PROCESS, indices.stop - first)
            self._start(state_dir / f"fleet-{first:05d}.log", [
                str(EXECUTABLE.parent / "edgefl-fleet"), "--first", str(first), "--count",
                str(count), "--data-dir", str(state_dir), "--seed", str(config.seed), *common])

    def _start(self, log: Path, command: list[str]) -> None:
        import subprocess

        with log.open("wb") as out:
            self.processes.append(subprocess.Popen(command, stdout=out,
                                                   stderr=subprocess.STDOUT))
        self.logs.append(log)

    def finish(self, timeout_s: float = 30.0) -> int:
        """Wait for the devices (they stop at the final global), then stop any left; failures."""
        import signal
        import subprocess

        deadline = time.monotonic() + timeout_s
        failed = 0
        for process, log in zip(self.processes, self.logs, strict=True):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)  # it says "offline" and exits
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.returncode not in (0, -signal.SIGTERM):
                failed += 1
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                logger.error("native device %s exited with %s: %s", log.stem,
                             process.returncode, tail[0] if tail else "no output")
        return failed
