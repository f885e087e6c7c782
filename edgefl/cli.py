"""`edgefl` command: export, aggregator, client and demo subcommands."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sqlite3
import sys
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from edgefl.gateway import AGGREGATOR_ID, load_gateway, worker_id

ConfigT = TypeVar("ConfigT")


def quiet_third_party(runtimes: bool = True) -> None:
    """Keep libraries' chatter off the terminal (logs, warnings, native prints) below ERROR.

    Call before torch is imported (its own logging switch is read then). `runtimes=False` leaves
    ONNX Runtime unimported: the gateway must not load it (it maps libtorch-sized libraries into
    the aggregator's memory).
    """
    from edge_client.native_logs import set_quiet

    # Export and runtime libraries are chatty at INFO; keep the user's terminal for our output.
    for name in ("root", "amqtt", "transitions", "torch", "torchao", "onnxruntime", "executorch",
                 "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # torch resets its loggers when imported, so only its own switch holds: "-torch" is ERROR for
    # the whole torch tree (torchao's import makes torch.utils._pytree warn about Enum constants).
    os.environ.setdefault("TORCH_LOGS", "-torch")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The tokenizer's thread pool warns when a process forks later (the broker is a subprocess).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_quiet(True)  # ExecuTorch's cpuinfo lines, ONNX Runtime's session warnings (C++ prints)
    if not runtimes:
        return
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # its graph warnings are not the user's concern
    except ImportError:  # the gateway image has no onnxruntime
        pass


def _artifacts(args: argparse.Namespace) -> Path:
    if args.artifacts:
        return Path(args.artifacts)
    try:
        from export.build import build_artifacts
    except ImportError as exc:  # the gateway image installs no torch
        raise SystemExit(f"--artifacts is required here ({exc}); copy an exported folder") from exc
    from edge_client.native_logs import native_stderr_silenced

    with native_stderr_silenced():  # ONNX Runtime's export prints its graph passes from C++
        return build_artifacts(args.workload)


def _gateway_connection(args: argparse.Namespace, identity: str) -> dict:
    """Host, port and TLS files: from --gateway's folder when given, else plain MQTT."""
    if not args.gateway:
        return {"host": args.host, "port": args.port, "tls": None}
    files = load_gateway(Path(args.gateway))
    return {"host": files.host, "port": files.port, "tls": files.tls_for(identity)}


def dp_report(args: argparse.Namespace) -> str | None:
    """The (ε, δ) a dp-fedavg federation will have spent after all its rounds, as a line."""
    if args.strategy != "dp-fedavg" or not args.dp_noise or args.dp_noise <= 0:
        return None
    from aggregator.accounting import epsilon

    eps = epsilon(args.dp_noise, args.rounds, args.dp_delta)
    budget = "" if args.dp_max_epsilon is None else f"; stops at ε = {args.dp_max_epsilon:g}"
    return (f"client-level DP: ε = {eps:.2f} at δ = {args.dp_delta:g} after {args.rounds} rounds "
            f"(noise multiplier {args.dp_noise}, every reporting device counted: no sampling "
            f"amplification{budget})")


def task_schedule(args: argparse.Namespace) -> tuple[tuple[int, ...], ...]:
    """--task-schedule "0,1;2,3;..." as class tuples; fed-talora defaults to the workload's."""
    text = getattr(args, "task_schedule", None)
    if not text:
        if args.strategy == "fed-talora":
            return _capability(args.workload, "incremental_tasks")  # type: ignore[return-value]
        return ()
    try:
        return tuple(tuple(int(c) for c in task.split(",")) for task in text.split(";"))
    except ValueError as exc:
        raise SystemExit(f"--task-schedule: expected class ids like '0,1;2,3', got {text!r}") \
            from exc


def _capability(workload: str, attribute: str) -> object:
    """A workload's optional capability (workloads.base.CAPABILITIES), or a one-line exit."""
    # The data half only: the gateway's aggregator command asks this too, and has no torch.
    from workloads.base import capability
    from workloads.registry import get_workload_data

    try:
        return capability(get_workload_data(workload), attribute)
    except ValueError as exc:
        raise SystemExit(f"edgefl: {exc}") from exc


def _config(kind: type[ConfigT], **fields: object) -> ConfigT:
    """Build a config dataclass; its validation errors end the command with a clear message."""
    try:
        return kind(**fields)
    except ValueError as exc:
        raise SystemExit(f"edgefl: {exc}") from exc


def cmd_export(args: argparse.Namespace) -> int:
    """Build (or find in the cache) a workload's training programs; print the folder."""
    from edge_client.native_logs import native_stderr_silenced
    from export.build import build_artifacts

    backends = tuple(args.backends.split(","))
    out = Path(args.out) if args.out else None
    with native_stderr_silenced():  # ONNX Runtime's export prints its graph passes from C++
        folder = build_artifacts(args.workload, args.batch_size, args.seed, out, backends)
    print(folder)
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    """Run the gateway aggregator against a broker until the federation's last round."""
    from safetensors.numpy import load_file

    from aggregator.coordinator import AggregatorConfig, Coordinator
    from aggregator.registry import check_mergeable, make_family
    from aggregator.store import GlobalStore, StorageError
    from aggregator.tiers import GatewayMerger, GatewayTier
    from aggregator.workers import MergingLeader, Supervisor
    from protocol.manifest import load_manifest
    from protocol.messages import TrainConfig
    from transport import TransportError
    from transport.mqtt import MqttTransport

    window_bytes = _window_bytes(args.window_mib)
    artifacts = _artifacts(args)
    config = _config(
        AggregatorConfig,
        federation=args.federation, rounds=args.rounds, clients_per_round=args.clients_per_round,
        min_clients=args.min_clients, round_deadline_s=args.deadline,
        train=TrainConfig(args.local_steps, args.lr, args.update_encoding, args.update_topk),
        strategy=args.strategy, mode=args.mode, max_staleness=args.max_staleness,
        clip_norm=args.clip_norm, dp_noise_multiplier=args.dp_noise, dp_delta=args.dp_delta,
        dp_max_epsilon=args.dp_max_epsilon, trim_beta=args.trim_beta,
        max_samples=args.max_samples, keep_rounds=args.keep_rounds, num_clusters=args.clusters,
        task_schedule=task_schedule(args), rounds_per_task=args.rounds_per_task,
    )
    manifest = load_manifest(artifacts)
    workers = args.workers or args.worker_index is not None
    gateways = _gateway_ids(args.merge_gateways)
    if args.upstream is not None:
        _gateway_ids(args.upstream, "--upstream")
    tiers = [o for o, on in (("--workers", workers), ("--upstream", args.upstream),
                             ("--merge-gateways", gateways)) if on]
    if len(tiers) > 1:
        raise SystemExit(f"edgefl: {' and '.join(tiers)} do not go together: a gateway under "
                         "an upstream aggregator, and the upstream one, run one process each")
    if gateways:  # the upstream round waits for one partial sum per gateway
        config = replace(config, clients_per_round=len(gateways),
                         min_clients=min(config.min_clients, len(gateways)))
    try:
        if tiers:  # first: no setting of the strategy would help
            check_mergeable(config, tiers[0])
        make_family(config, manifest)  # refuse a broken combination before touching anything
    except ValueError as exc:
        raise SystemExit(f"edgefl: {exc}") from exc
    if args.workers < 0:
        raise SystemExit(f"edgefl: --workers must be 0 (one process) or more, got {args.workers}")
    if args.workers and args.gateway:
        have = len(load_gateway(Path(args.gateway)).workers)
        if have < args.workers:  # the broker takes one connection per certificate
            raise SystemExit(f"edgefl: --workers {args.workers} needs {args.workers} worker "
                             f"identities in {args.gateway}, which has {have}: run `edgefl "
                             f"gateway workers --gateway {args.gateway} {args.workers}`, then "
                             "reload the broker (kill -HUP)")
    if args.worker_index is not None:
        return _run_worker(args, config, manifest, artifacts, window_bytes)
    secure = _gateway_connection(args, AGGREGATOR_ID)
    if args.worker_kind == "native":
        from aggregator.native_workers import check_native

        if not args.workers:
            raise SystemExit("edgefl: --worker-kind native needs --workers N")
        try:
            check_native(config, manifest)
        except ValueError as exc:
            raise SystemExit(f"edgefl: {exc}") from exc
    registry = _signing_registry(args)
    config = replace(config,
                     allowed_devices=gateways or _allowed_devices(args, registry is not None))
    # The status port first: a taken port is one clear line before any state is written.
    coordinator: Coordinator | None = None
    status = None
    if args.status_port is not None:
        from aggregator.status import StatusServer
        from edgefl.gateway import certificate_expiry

        expiry = certificate_expiry(load_gateway(Path(args.gateway))) if args.gateway else {}

        def snapshot():  # noqa: ANN202 (the page answers 500 until the coordinator is up)
            if coordinator is None:
                raise RuntimeError("the aggregator is starting")
            return replace(coordinator.snapshot(), certificates=expiry)

        status = StatusServer(snapshot, args.status_host, args.status_port)
        try:
            status.start()
        except OSError as exc:
            raise SystemExit(f"edgefl: cannot serve the status page on "
                             f"{args.status_host}:{args.status_port}: {exc.strerror or exc}") \
                from exc
    # Persistent session + manual acks: updates sent while the aggregator is down, or received
    # but not yet committed when it died, are delivered again when it comes back.
    client_id = f"aggregator-{args.federation}" + ("-leader" if workers else "")
    transport = MqttTransport(secure["host"], secure["port"], client_id,
                              persistent_session=True, manual_ack=True, tls=secure["tls"],
                              window_bytes=window_bytes)
    supervisor = None
    try:
        store = GlobalStore(Path(args.state_dir) / args.federation)
        transport.start()
        extra: dict[str, object] = (
            {"gateway_id": args.upstream} if args.upstream
            else {"workers": args.workers, "worker_kind": args.worker_kind} if workers else {})
        kind = (MergingLeader if workers else GatewayTier if args.upstream
                else GatewayMerger if gateways else Coordinator)
        coordinator = kind(config, manifest,
                           load_file(str(artifacts / manifest.files["adapter_init"])),
                           transport, store, registry=registry, **extra)
        if workers:  # started once round 0's global is stored: they follow the state from it
            make = (partial(_native_command, args, config, manifest, store.folder)
                    if args.worker_kind == "native" else partial(_worker_command, args, artifacts))
            supervisor = Supervisor(make, args.workers)
            supervisor.start()
    except (ValueError, OSError, StorageError, sqlite3.Error, TransportError) as exc:
        if status is not None:
            status.stop()
        transport.stop()
        raise SystemExit(f"edgefl: {exc}") from exc
    report = dp_report(args)
    if report:
        print(report, flush=True)
    if status is not None:
        print(f"status page: {status.url}", flush=True)
    # The supervisor's poll is the run loop's stop check, its tick (it never asks to stop).
    tick = supervisor.poll if supervisor is not None else (lambda: False)
    try:
        for record in coordinator.run(tick):
            # FL-TAC counts task slots (a multi-task device sends one update per task)
            unit = ("task slots" if coordinator.family.task_slots
                    else "gateways" if gateways else "devices")
            print(f"round {record.round}: {len(record.devices)} {unit}, {record.samples} samples,"
                  f" metrics {record.metrics}")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if status is not None:
            status.stop()
        transport.stop()
    return 0


def _gateway_ids(text: str | None, option: str = "--merge-gateways") -> frozenset[str]:
    """A comma-separated list of gateway ids as a set, or a one-line exit for an unusable one."""
    if text is None:
        return frozenset()
    from protocol.messages import check_segment

    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        ids = frozenset(check_segment(n, "gateway id") for n in names)
    except ValueError as exc:
        raise SystemExit(f"edgefl: {option}: {exc}") from exc
    if not ids:
        raise SystemExit(f"edgefl: {option} names no gateway")
    if len(ids) != len(names):
        raise SystemExit(f"edgefl: {option} needs distinct gateway ids, got {text!r}")
    if option == "--upstream" and len(ids) > 1:
        raise SystemExit(f"edgefl: --upstream takes this gateway's one id, got {text!r}")
    return ids


def _signing_registry(args: argparse.Namespace) -> object | None:
    """With --gateway, the aggregator's signing registry (device id -> public key), re-read
    whenever `edgefl gateway enroll|revoke` changes it: no restart needed. None without."""
    if not args.gateway:
        return None
    from protocol.signing import RegistryFile

    return RegistryFile(load_gateway(Path(args.gateway)).signing_registry)


def _worker_command(args: argparse.Namespace, artifacts: Path, index: int) -> list[str]:
    """The command line of worker `index`: the leader's own, for that worker's part."""
    return [sys.executable, "-m", "edgefl", *args.argv, "--artifacts", str(artifacts),
            "--worker-index", str(index)]


def _native_command(args: argparse.Namespace, config: object, manifest: object, folder: Path,
                    index: int) -> list[str]:
    """The command line of native worker `index`, its spec file written first: its own TLS
    identity and the signing registry on a gateway, as a Python worker's (_run_worker)."""
    from aggregator.native_workers import command, write_spec

    secure = _gateway_connection(args, worker_id(index))
    registry = load_gateway(Path(args.gateway)).signing_registry if args.gateway else None
    return command(write_spec(folder, index, config, manifest, secure["host"], secure["port"],
                              secure["tls"], registry))


def _run_worker(args: argparse.Namespace, config: object, manifest: object, artifacts: Path,
                window_bytes: int) -> int:
    """One worker process of `edgefl aggregator --workers N` (started by the leader)."""
    from safetensors.numpy import load_file

    from aggregator.store import GlobalStore, StorageError
    from aggregator.workers import IngestWorker
    from transport import TransportError
    from transport.mqtt import MqttTransport

    name = f"w{args.worker_index}"
    secure = _gateway_connection(args, worker_id(args.worker_index))
    registry = _signing_registry(args)
    config = replace(config, allowed_devices=_allowed_devices(args, registry is not None,
                                                              warn=False))
    transport = MqttTransport(secure["host"], secure["port"],
                              f"aggregator-{args.federation}-{name}", persistent_session=True,
                              manual_ack=True, tls=secure["tls"], window_bytes=window_bytes)
    try:
        store = GlobalStore(Path(args.state_dir) / args.federation)
        transport.start()
        worker = IngestWorker(config, manifest,
                              load_file(str(artifacts / manifest.files["adapter_init"])),
                              transport, store, worker=name, registry=registry)
    except (ValueError, OSError, StorageError, sqlite3.Error, TransportError) as exc:
        transport.stop()
        raise SystemExit(f"edgefl: worker {name}: {exc}") from exc
    try:
        worker.run()
    finally:
        transport.stop()
    return 0


def _window_bytes(mib: float) -> int:
    """--window-mib in bytes, or a one-line exit for a value that is not a positive size."""
    if not (math.isfinite(mib) and mib > 0):
        raise SystemExit(f"edgefl: --window-mib must be a positive number of MiB, got {mib}")
    return max(1, int(mib * 2**20))


def _allowed_devices(args: argparse.Namespace, signed: bool, warn: bool = True
                     ) -> frozenset[str] | None:
    """Who may send updates: --allowed-devices; else, with --gateway, whoever the signing
    registry holds (checked per update); else any device id, with a warning (`warn`: once per
    gateway, so not from its worker processes)."""
    if args.allowed_devices:
        names = [n.strip() for n in args.allowed_devices.split(",") if n.strip()]
        if not names:
            raise SystemExit("edgefl: --allowed-devices names no device")
        return frozenset(names)
    if signed:
        return None  # an update from a device the registry does not hold fails its signature
    if warn:
        logging.getLogger("edgefl").warning(
            "plain mode without --allowed-devices: any device id may send updates")
    return None


def cmd_client(args: argparse.Namespace) -> int:
    """Run one emulated device: a Dirichlet share of the workload's data, trained with a backend."""
    from edge_client.agent import DeviceAgent, device_seed
    from edge_client.data import multitask_tasks
    from edge_client.trainer import make_trainer
    from protocol.manifest import load_manifest
    from transport import TransportError
    from transport.mqtt import MqttTransport
    from workloads.registry import get_workload_data

    if args.multitask:
        _capability(args.workload, "task_labellings")  # before any export or connection
    artifacts = _artifacts(args)
    # The artifacts say which workload they were exported for (--artifacts may name any folder).
    workload = get_workload_data(load_manifest(artifacts).workload)
    data = workload.device_data(args.index, args.num_devices, args.alpha, args.seed)
    device_id = args.device_id or f"device-{args.index:03d}"
    secure = _gateway_connection(args, device_id)
    signing_key = None
    if args.gateway:
        from protocol.signing import load_private_key

        signing_key = load_private_key(load_gateway(Path(args.gateway)).signing_keys[device_id])
    # With --gateway the broker takes the certificate's name (the device id) as the username,
    # and its ACL patterns match on that, not on the client id.
    transport = MqttTransport(secure["host"], secure["port"], f"{args.federation}-{device_id}",
                              will=DeviceAgent.will(args.federation, device_id), tls=secure["tls"])
    # --multitask (FL-TAC): one local task per task of the workload, its own share of each
    tasks = (list(multitask_tasks(workload, args.index, args.num_devices, args.alpha, args.seed,
                                  slot_seed=device_seed(device_id)).values())
             if args.multitask else [])
    agent = DeviceAgent(device_id, args.federation, make_trainer(args.backend, artifacts),
                        None if tasks else data.x, None if tasks else data.y, transport,
                        Path(args.state_dir), device_seed(device_id), signing_key=signing_key,
                        tasks=tasks)
    try:
        rounds = agent.run()
    except TransportError as exc:
        raise SystemExit(f"edgefl: {exc}") from exc
    print(f"{device_id}: trained {rounds} rounds")
    return 0


def _federation_config(args: argparse.Namespace, out: str) -> object:
    """The demo's or emulate's run: flags, else the workload's defaults for that command."""
    from edge_client.fleet import FleetConfig
    from edgefl.demo import FederationConfig
    from workloads.registry import get_workload_data

    data = get_workload_data(args.workload)
    size = data.demo if args.command == "demo" else data.emulate

    def given(value: object, default: object) -> object:
        return default if value is None else value

    lo, _, hi = args.slowdown.partition(",")
    fleet = _config(
        FleetConfig,
        devices=given(args.devices, size.devices), backends=tuple(args.backends.split(",")),
        alpha=args.alpha, seed=args.seed, slowdown=(float(lo), float(hi or lo)),
        dropout=args.dropout, connection_loss=args.connection_loss,
        multitask=args.strategy == "fltac", native=args.native,
    )
    return _config(
        FederationConfig, fleet=fleet, rounds=given(args.rounds, size.rounds),
        local_steps=given(args.local_steps, size.local_steps),
        learning_rate=given(args.lr, size.learning_rate), participation=args.participation,
        quorum=args.quorum, deadline_s=args.deadline,
        mode=args.mode, out_dir=Path(args.out or out), broker=args.broker,
        update_encoding=args.update_encoding, update_topk=args.update_topk,
        strategy=args.strategy, workload=args.workload, num_clusters=args.clusters,
        task_schedule=task_schedule(args), rounds_per_task=args.rounds_per_task,
        aggregator_workers=args.aggregator_workers,
        aggregator_worker_kind=args.aggregator_worker_kind,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Run broker + aggregator + emulated devices; exit 1 if accuracy did not rise."""
    from edgefl.demo import run_federation

    result = run_federation(_federation_config(args, "runs/demo"))
    return 0 if result.improved else 1


def cmd_emulate(args: argparse.Namespace) -> int:
    """Run a large emulated fleet; exit 1 if no round completed or accuracy did not rise."""
    from edgefl.demo import run_federation

    result = run_federation(_federation_config(args, "runs/emulate"))
    return 0 if result.improved else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    from aggregator.config import DEFAULT_MAX_SAMPLES
    from aggregator.registry import STRATEGY_NAMES
    from edge_client.trainer import BACKENDS
    from edgefl.gateway import add_gateway_parser
    from protocol.quant import ENCODINGS
    from transport.mqtt import WINDOW_BYTES
    from workloads import WORKLOAD_NAMES

    parser = argparse.ArgumentParser(prog="edgefl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def method_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--clusters", type=int, default=2,
                       help="fltac: K, the number of tasks the devices' task slots serve")
        p.add_argument("--task-schedule",
                       help="continual learning: classes of each task in order, e.g. "
                            "'0,1;2,3;4,5;6,7;8,9' (fed-talora's default)")
        p.add_argument("--rounds-per-task", type=int, default=1,
                       help="rounds each task of --task-schedule lasts (the last one: to the end)")

    def broker_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=1883)
        p.add_argument("--federation", default="default")
        p.add_argument("--workload", choices=WORKLOAD_NAMES, default="fmnist-cnn")
        p.add_argument("--artifacts", help="artifact folder (default: build/reuse the cache)")
        p.add_argument("--state-dir", default="state", help="where durable state is kept")
        p.add_argument("--gateway", help="folder from `edgefl gateway init`: TLS, signed updates")

    p = sub.add_parser("export", help="build training programs for a workload")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="fmnist-cnn")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial adapter")
    p.add_argument("--backends", default="executorch,onnxruntime")
    p.add_argument("--out", help="parent folder (default: the cache)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("aggregator", help="run the gateway aggregator")
    broker_args(p)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--min-clients", type=int, default=2)
    p.add_argument("--deadline", type=float, default=120.0, help="round deadline in seconds")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--strategy", default="fedavg",
                   choices=STRATEGY_NAMES)
    p.add_argument("--update-encoding", choices=ENCODINGS, default="fp32",
                   help="how devices encode updates (compact ones send deltas)")
    p.add_argument("--update-topk", type=float, help="send only this fraction of entries")
    p.add_argument("--clip-norm", type=float, help="clip each update's change to this L2 norm")
    p.add_argument("--dp-noise", type=float,
                   help="dp-fedavg: Gaussian noise multiplier (with --clip-norm)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="dp-fedavg: δ of (ε, δ)-DP")
    p.add_argument("--dp-max-epsilon", type=float,
                   help="dp-fedavg: stop the federation before a round would spend more ε")
    p.add_argument("--trim-beta", type=float, default=0.2,
                   help="trimmed_mean: fraction trimmed at each end (β·min-clients must be ≥ 1)")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help="cap on the sample count one update is weighted by")
    p.add_argument("--keep-rounds", type=int, default=10,
                   help="how many recent rounds' globals (and kept updates) the state keeps")
    p.add_argument("--allowed-devices",
                   help="comma-separated device ids allowed to send updates (default: the "
                        "enrolled devices with --gateway, else any)")
    p.add_argument("--status-port", type=int,
                   help="serve the status page, /api/status, /metrics and /healthz on this port")
    p.add_argument("--status-host", default="127.0.0.1",
                   help="address for --status-port (the page has no auth; default: this machine)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync rounds, or async FedBuff (a version every --clients-per-round)")
    p.add_argument("--max-staleness", type=int, default=4,
                   help="async: oldest version an update may start from")
    p.add_argument("--window-mib", type=float, default=WINDOW_BYTES / 2**20,
                   help="received updates held in memory before the aggregator stops reading "
                        "from the broker, which keeps the rest (default %(default)g)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="N worker processes take the updates through an MQTT 5 shared "
                        "subscription and this one merges their partial sums (fedavg, flora, "
                        "colora; default 0: this process does it all)")
    p.add_argument("--worker-kind", choices=("python", "native"), default="python",
                   help="with --workers: Python worker processes, or the native C++ ingest "
                        "worker (bash scripts/build_ingest.sh; no --clip-norm)")
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers
    p.add_argument("--upstream", metavar="GATEWAY_ID",
                   help="this gateway's rounds go upstream as partial sums (through a broker "
                        "bridge) and the globals come from the upstream aggregator")
    p.add_argument("--merge-gateways", metavar="IDS",
                   help="upstream aggregator: merge the partial sums of these gateways "
                        "(comma-separated ids given to their --upstream) into each global")
    method_args(p)
    p.set_defaults(func=cmd_aggregator)

    p = sub.add_parser("client", help="run one emulated device")
    broker_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="executorch")
    p.add_argument("--device-id")
    p.add_argument("--index", type=int, default=0, help="which Dirichlet share this device holds")
    p.add_argument("--num-devices", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multitask", action="store_true",
                   help="FL-TAC device: one local task per task of the workload (Fashion-MNIST: "
                        "clothing type, garment group; fortunes: topic, language)")
    p.set_defaults(func=cmd_client)

    def federation_args(p: argparse.ArgumentParser, backends: str, participation: float,
                        deadline: float) -> None:
        # Fleet size, rounds, steps and learning rate default to the workload's own `demo` /
        # `emulate` RunSize: a MiniLM step takes ~0.35 s here, a CNN step under 10 ms.
        p.add_argument("--devices", type=int, help="default: the workload's")
        p.add_argument("--backends", default=backends, help="comma-separated, used in turn")
        p.add_argument("--native", type=int, default=0, metavar="N",
                       help="run N of the devices as native C++ devices (edge_client/native; "
                            "built on first use)")
        p.add_argument("--rounds", type=int, help="default: the workload's")
        p.add_argument("--local-steps", type=int, help="default: the workload's")
        p.add_argument("--lr", type=float, help="default: the workload's")
        p.add_argument("--alpha", type=float, default=0.5,
                       help="Dirichlet label skew (smaller: more skew)")
        p.add_argument("--participation", type=float, default=participation,
                       help="fraction of devices whose updates close a round early")
        p.add_argument("--quorum", type=float, default=0.5,
                       help="fraction of devices that closes a round at the deadline")
        p.add_argument("--deadline", type=float, default=deadline, help="round deadline, s")
        p.add_argument("--mode", choices=("sync", "async"), default="sync")
        p.add_argument("--update-encoding", choices=ENCODINGS, default="fp32",
                       help="how devices encode updates (compact ones send deltas)")
        p.add_argument("--update-topk", type=float, help="send only this fraction of entries")
        p.add_argument("--strategy", default="fedavg",
                       choices=STRATEGY_NAMES)
        p.add_argument("--dropout", type=float, default=0.0,
                       help="chance a device sits a round out")
        p.add_argument("--connection-loss", type=float, default=0.0,
                       help="chance a device loses its link before sending")
        p.add_argument("--slowdown", default="1",
                       help="device compute slowdown range 'lo,hi' (1 = this machine)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--workload", choices=WORKLOAD_NAMES, default="fmnist-cnn",
                       help="fmnist-fedsq: FedSQ, gates fixed by a frozen structural copy; "
                            "fmnist-colora: CoLoRA, a personal r x r core per device; "
                            "minilm-fortunes: pretrained all-MiniLM-L6-v2 on fortune quotes")
        p.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
        p.add_argument("--out", help="results folder")
        p.add_argument("--aggregator-workers", type=int, default=0, metavar="N",
                       help="run the aggregator as edgefl aggregator --workers N does: N worker "
                            "processes on a shared subscription and a merging leader")
        p.add_argument("--aggregator-worker-kind", choices=("python", "native"),
                       default="python",
                       help="with --aggregator-workers: Python workers, or the native C++ "
                            "edgefl-ingest (bash scripts/build_ingest.sh)")
        method_args(p)

    p = sub.add_parser("demo", help="broker + aggregator + a few devices of a workload")
    federation_args(p, backends="executorch,onnxruntime", participation=1.0, deadline=300.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("emulate", help="a large emulated fleet (hundreds to thousands)")
    federation_args(p, backends="onnxruntime", participation=0.9, deadline=120.0)
    p.set_defaults(func=cmd_emulate)

    add_gateway_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgefl` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # workers are started with it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time
    if not args.verbose:  # -v shows the libraries' own warnings too
        # Only the commands that train or export load the runtimes; the gateway's stay lean.
        quiet_third_party(runtimes=args.command in ("client", "demo", "emulate", "export"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        for name in ("aggregator", "edge_client", "export", "transport", "workloads", "edgefl"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:
        # Bad input (a missing file, a malformed folder, a refused setting) is one line; -v
        # shows where it came from.
        if args.verbose:
            raise
        print(f"edgefl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
