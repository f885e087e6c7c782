"""`edgefl` command: export, aggregator, client and demo subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path


def _quiet_third_party() -> None:
    # Export and runtime libraries are chatty at INFO; keep the user's terminal for our output.
    for name in ("root", "amqtt", "transitions", "torch", "torchao", "onnxruntime", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # its graph warnings are not the user's concern
    except ImportError:  # the gateway image has no onnxruntime
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time


def _artifacts(args: argparse.Namespace) -> Path:
    if args.artifacts:
        return Path(args.artifacts)
    try:
        from export.build import build_artifacts
    except ImportError as exc:  # the gateway image installs no torch
        raise SystemExit(f"--artifacts is required here ({exc}); copy an exported folder") from exc

    return build_artifacts(args.workload)


def cmd_export(args: argparse.Namespace) -> int:
    """Build (or find in the cache) a workload's training programs; print the folder."""
    from export.build import build_artifacts

    backends = tuple(args.backends.split(","))
    out = Path(args.out) if args.out else None
    print(build_artifacts(args.workload, args.batch_size, args.seed, out, backends))
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    """Run the gateway aggregator against a broker until the federation's last round."""
    from safetensors.numpy import load_file

    from aggregator.coordinator import AggregatorConfig, Coordinator
    from aggregator.store import GlobalStore
    from protocol.manifest import load_manifest
    from protocol.messages import TrainConfig
    from transport.mqtt import MqttTransport

    artifacts = _artifacts(args)
    config = AggregatorConfig(
        federation=args.federation, rounds=args.rounds, clients_per_round=args.clients_per_round,
        min_clients=args.min_clients, round_deadline_s=args.deadline,
        train=TrainConfig(args.local_steps, args.lr), strategy=args.strategy,
        mode=args.mode, max_staleness=args.max_staleness,
    )
    # Persistent session + manual acks: updates sent while the aggregator is down, or received
    # but not yet committed when it died, are delivered again when it comes back.
    transport = MqttTransport(args.host, args.port, f"aggregator-{args.federation}",
                              persistent_session=True, manual_ack=True)
    transport.start()
    manifest = load_manifest(artifacts)
    coordinator = Coordinator(config, manifest,
                              load_file(str(artifacts / manifest.files["adapter_init"])), transport,
                              GlobalStore(Path(args.state_dir) / args.federation))
    try:
        for record in coordinator.run():
            print(f"round {record.round}: {len(record.devices)} devices, {record.samples} samples,"
                  f" metrics {record.metrics}")
    finally:
        transport.stop()
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Run one emulated device: a Dirichlet share of Fashion-MNIST, trained with a backend."""
    from edge_client.agent import DeviceAgent, device_seed
    from edge_client.data import device_data
    from edge_client.trainer import make_trainer
    from transport.mqtt import MqttTransport

    artifacts = _artifacts(args)
    data = device_data(args.index, args.num_devices, args.alpha, args.seed)
    device_id = args.device_id or f"device-{args.index:03d}"
    transport = MqttTransport(args.host, args.port, f"{args.federation}-{device_id}",
                              will=DeviceAgent.will(args.federation, device_id))
    agent = DeviceAgent(device_id, args.federation, make_trainer(args.backend, artifacts),
                        data.x, data.y, transport, Path(args.state_dir), device_seed(device_id))
    rounds = agent.run()
    print(f"{device_id}: trained {rounds} rounds")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run broker + aggregator + emulated devices; exit 1 if accuracy did not rise."""
    from edgefl.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(
        devices=args.devices, rounds=args.rounds, local_steps=args.local_steps,
        learning_rate=args.lr, alpha=args.alpha, backends=tuple(args.backends.split(",")),
        seed=args.seed, out_dir=Path(args.out), broker=args.broker,
    ))
    return 0 if result.improved else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    from edge_client.trainer import BACKENDS
    from workloads import WORKLOAD_NAMES

    parser = argparse.ArgumentParser(prog="edgefl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def broker_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=1883)
        p.add_argument("--federation", default="default")
        p.add_argument("--workload", choices=WORKLOAD_NAMES, default="fmnist-cnn")
        p.add_argument("--artifacts", help="artifact folder (default: build/reuse the cache)")
        p.add_argument("--state-dir", default="state", help="where durable state is kept")

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
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync rounds, or async FedBuff (a version every --clients-per-round)")
    p.add_argument("--max-staleness", type=int, default=4,
                   help="async: oldest version an update may start from")
    p.set_defaults(func=cmd_aggregator)

    p = sub.add_parser("client", help="run one emulated device")
    broker_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="executorch")
    p.add_argument("--device-id")
    p.add_argument("--index", type=int, default=0, help="which Dirichlet share this device holds")
    p.add_argument("--num-devices", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("demo", help="broker + aggregator + emulated devices on Fashion-MNIST")
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew (smaller: more)")
    p.add_argument("--backends", default="executorch,onnxruntime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgefl` console script."""
    args = build_parser().parse_args(argv)
    _quiet_third_party()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        for name in ("aggregator", "edge_client", "export", "transport", "workloads", "edgefl"):
            logging.getLogger(name).setLevel(logging.INFO)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
