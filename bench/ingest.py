"""Aggregator ingest rate vs raw Mosquitto throughput, and aggregator peak memory as N grows.

    python -m bench.ingest --workload fmnist-cnn,minilm-fortunes --memory-n '' --burst 1000

`--workload` takes one workload or a comma-separated list (one JSON object either way: several
workloads sit under "workloads"). `--burst N` also publishes N updates at once to a fresh
aggregator and reports its peak RSS above idle: the receive window must hold it under
BURST_TARGET_MIB, and every update must be accepted (nothing dropped).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import (
    WORKLOADS,
    current_rss_mib,
    emit,
    machine,
    median,
    peak_rss_mib,
    quiet,
    quiet_torch,
    reset_peak_rss,
)

READY = "ready"
CHILD_TIMEOUT_S = 600.0
BURST_TARGET_MIB = 64.0  # the aggregator's peak RSS above idle under a burst (issue target)


def _cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used so far."""
    return time.process_time()  # nanosecond clock: os.times() counts 10 ms ticks


# -- children: the consumer under test, in its own process ------------------------------------
def _raw_child(port: int, federation: str, n: int) -> dict[str, float]:
    """A plain paho subscriber that only counts messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol import topics

    subscribed, done = threading.Event(), threading.Event()
    count = [0]

    def on_message(client, userdata, msg) -> None:  # noqa: ANN001
        count[0] += 1
        if count[0] >= n:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{federation}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topics.update_filter(federation), qos=1)
    subscribed.wait(30)
    reset_peak_rss()
    peak_before = peak_rss_mib()
    cpu_before = _cpu_s()
    print(READY, flush=True)
    done.wait(CHILD_TIMEOUT_S)
    finished = time.monotonic()
    cpu = _cpu_s() - cpu_before
    client.disconnect()
    client.loop_stop()
    return {"done": finished, "received": count[0], "peak_before_mib": peak_before,
            "peak_end_mib": peak_rss_mib(), "cpu_s": cpu}


def _coordinator_child(port: int, federation: str, n: int, artifacts: Path, strategy: str
                       ) -> dict[str, Any]:
    """The real Coordinator (GlobalStore in a temp dir, persistent session, manual acks)."""
    from safetensors.numpy import load_file

    from aggregator.coordinator import AggregatorConfig, Coordinator
    from aggregator.store import GlobalStore
    from protocol import topics
    from protocol.codec import encode_status
    from protocol.manifest import load_manifest
    from transport.mqtt import MqttTransport

    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    transport = MqttTransport("127.0.0.1", port, f"aggregator-{federation}",
                              persistent_session=True, manual_ack=True)
    transport.start()
    transport.subscribe(topics.update_filter(federation), qos=1)
    transport.subscribe(topics.status_filter(federation), qos=1)
    closed: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        config = AggregatorConfig(federation=federation, rounds=1, clients_per_round=n,
                                  min_clients=n, round_deadline_s=CHILD_TIMEOUT_S,
                                  strategy=strategy)
        coordinator = Coordinator(config, manifest, initial, transport, GlobalStore(Path(tmp)),
                                  on_round=lambda record, adapter: closed.append(time.monotonic()))
        # The broker handles subscriptions in order: once our own probe on the status filter
        # comes back, the update subscription is live too.
        probe = topics.status_topic(federation, "probe")
        transport.publish(probe, encode_status(True, "probe"), qos=1)
        while (message := transport.receive(timeout=30)) is not None and message.topic != probe:
            pass
        if message is not None:
            transport.ack(message)
        # Peak accounting restarts here: what follows is the round's own memory.
        reset_peak_rss()
        rss_before, peak_before = current_rss_mib(), peak_rss_mib()
        held_max, sampling = [0], threading.Event()

        def sample_window() -> None:  # received but not yet acknowledged: the backlog we hold
            while not sampling.wait(0.005):
                held_max[0] = max(held_max[0], transport.held[0])

        sampler = threading.Thread(target=sample_window, daemon=True)
        sampler.start()
        cpu_before = _cpu_s()
        print(READY, flush=True)
        records = coordinator.run()
        cpu = _cpu_s() - cpu_before
        sampling.set()
        sampler.join()
        transport.stop()
    return {"done": closed[0] if closed else float("nan"),
            "accepted": len(records[0].devices) if records else 0,
            "rejections": dict(coordinator.rejections),
            "rss_before_mib": rss_before, "peak_before_mib": peak_before,
            "peak_end_mib": peak_rss_mib(), "max_inbox": held_max[0], "cpu_s": cpu,
            "pauses": transport.pauses, "window_bytes": transport.window_bytes,
            "window_messages": transport.window_messages}


# -- parent: one publisher, the payloads, the bookkeeping -----------------------------------
def make_payloads(artifacts: Path, federation: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` valid fp32 updates from distinct devices: adapter_init plus a little noise each."""
    from safetensors.numpy import load_file

    from protocol import topics
    from protocol.codec import encode_update
    from protocol.manifest import load_manifest
    from protocol.messages import Update

    manifest = load_manifest(artifacts)
    initial = load_file(str(artifacts / manifest.files["adapter_init"]))
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(n):
        device = f"dev-{i:05d}"
        adapter = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
                   for k, v in initial.items()}
        update = Update(federation=federation, round=0, device_id=device,
                        manifest_sha256=manifest.sha256, num_samples=int(rng.integers(50, 500)),
                        update_id=f"{device}-0-{uuid.uuid4().hex[:12]}", adapter=adapter)
        payloads.append((topics.update_topic(federation, device), encode_update(update)))
    return payloads


def run_once(port: int, mode: str, payloads: list[tuple[str, bytes]], federation: str,
             artifacts: Path, strategy: str = "fedavg", pace_per_s: float | None = None
             ) -> dict[str, Any]:
    """Start the consumer `mode` in a child, publish every payload (QoS 1), time until done.

    The payloads must belong to `federation`. Use a fresh federation for every coordinator run:
    its persistent session outlives it, and the broker keeps queueing that federation's updates.
    With `pace_per_s`, updates are sent at that rate instead of all at once.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    command = [sys.executable, "-m", "bench.ingest", "--child", mode, "--port", str(port),
               "--federation", federation, "--updates", str(len(payloads)),
               "--artifacts", str(artifacts), "--strategy", strategy]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != READY:
        child.kill()
        raise RuntimeError(f"{mode} consumer did not start")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{federation}",
                            protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    started = time.monotonic()
    for i, (topic, payload) in enumerate(payloads):
        if pace_per_s:
            time.sleep(max(0.0, started + i / pace_per_s - time.monotonic()))
        publisher.publish(topic, payload, qos=1)
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    publisher.disconnect()
    publisher.loop_stop()
    figures = json.loads(out.strip().splitlines()[-1])
    elapsed = float(figures.pop("done")) - started
    return figures | {"seconds": elapsed, "updates_per_s": len(payloads) / elapsed}


def _workloads(text: str) -> list[str]:
    """Parse --workload: one name or a comma-separated list of them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(WORKLOADS)}; got {text!r}")
    return names


def measure_rate(port: int, artifacts: Path, updates: int, repeats: int
                 ) -> tuple[dict[str, Any], list[float]]:
    """Raw subscriber and aggregator, `repeats` interleaved pairs; the figures and agg rates."""
    raw_rates, agg_rates, ratios, raw_cpu, agg_cpu, size = [], [], [], [], [], 0
    for i in range(repeats):
        # Fresh federation names each time: no retained global or queued session carries over.
        federation = f"bench-{uuid.uuid4().hex[:8]}"
        payloads = make_payloads(artifacts, federation, updates, seed=i)
        size = int(median([len(p) for _, p in payloads]))
        raw = run_once(port, "raw", payloads, federation, artifacts)
        agg = run_once(port, "coordinator", payloads, federation, artifacts)
        if agg["accepted"] != updates:
            raise RuntimeError(f"coordinator accepted {agg['accepted']} of {updates}: "
                               f"{agg['rejections']}")
        raw_rates.append(raw["updates_per_s"])
        agg_rates.append(agg["updates_per_s"])
        ratios.append(agg["updates_per_s"] / raw["updates_per_s"])
        raw_cpu.append(raw["cpu_s"] / updates * 1e6)
        agg_cpu.append(agg["cpu_s"] / updates * 1e6)
    return {
        "updates": updates, "repeats": repeats, "payload_bytes": size,
        "baseline": "raw-subscriber",
        "raw_msgs_per_s": round(median(raw_rates), 1),
        "aggregator_updates_per_s": round(median(agg_rates), 1),
        "ratio_vs_raw": round(median(ratios), 4),
        "raw_runs": [round(r, 1) for r in raw_rates],
        "aggregator_runs": [round(r, 1) for r in agg_rates],
        # Each consumer process's CPU time (all its threads) per message: what the rate costs.
        "raw_cpu_us_per_msg": round(median(raw_cpu)),
        "aggregator_cpu_us_per_update": round(median(agg_cpu)),
    }, agg_rates


def measure_memory(port: int, artifacts: Path, sizes: list[int], strategies: list[str],
                   pace: float) -> dict[str, dict[str, dict[str, Any]]]:
    """Peak RSS growth per strategy and fleet size, all at once ("burst") and paced."""
    scan: dict[str, dict[str, dict[str, Any]]] = {}
    for n in sizes:
        for strategy in strategies:
            for mode, pace_per_s in (("burst", None), ("paced", pace)):
                federation = f"bench-{uuid.uuid4().hex[:8]}"
                payloads = make_payloads(artifacts, federation, n, seed=1000 + n)
                run = run_once(port, "coordinator", payloads, federation, artifacts,
                               strategy, pace_per_s)
                if run["accepted"] != n:
                    raise RuntimeError(f"{strategy}: accepted {run['accepted']} of {n}")
                scan.setdefault(strategy, {}).setdefault(str(n), {})[mode] = {
                    "peak_growth_mib": round(run["peak_end_mib"] - run["peak_before_mib"], 1),
                    "max_inbox_messages": run["max_inbox"],
                    "updates_per_s": round(run["updates_per_s"], 1),
                }
    return scan


def measure_burst(port: int, artifacts: Path, n: int) -> dict[str, Any]:
    """`n` updates published at once to a fresh FedAvg aggregator: all accepted, and its peak
    RSS above idle (measured just before the round) against BURST_TARGET_MIB."""
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    payloads = make_payloads(artifacts, federation, n, seed=2000 + n)
    run = run_once(port, "coordinator", payloads, federation, artifacts)
    above_idle = run["peak_end_mib"] - run["rss_before_mib"]
    return {
        "updates": n, "strategy": "fedavg", "payload_bytes": int(median([len(p) for _, p in
                                                                          payloads])),
        "accepted": run["accepted"], "rejections": run["rejections"],
        "idle_rss_mib": round(run["rss_before_mib"], 1),
        "peak_rss_mib": round(run["peak_end_mib"], 1),
        "peak_above_idle_mib": round(above_idle, 1), "target_mib": BURST_TARGET_MIB,
        "within_target": above_idle <= BURST_TARGET_MIB and run["accepted"] == n,
        "window_mib": round(run["window_bytes"] / 2**20, 1),
        "window_messages": run["window_messages"],
        "max_held_messages": run["max_inbox"], "pauses": run["pauses"],
        "updates_per_s": round(run["updates_per_s"], 1),
    }


def measure(port: int, workload: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Every figure of one workload, and its one-line summary."""
    from export.build import build_artifacts

    artifacts = build_artifacts(workload)
    rate, agg_rates = measure_rate(port, artifacts, args.updates, args.repeats)
    # Memory: "burst" sends all N at once (as the rate test does); "paced" sends them at a
    # fraction of the measured ingest rate, so no backlog builds up inside the aggregator.
    pace = args.pace_fraction * median(agg_rates)
    sizes = [int(n) for n in args.memory_n.split(",") if n]
    scan = measure_memory(port, artifacts, sizes, args.strategies.split(","), pace)
    adapter_mib = sum(v.nbytes for v in _initial(artifacts).values()) / 2**20
    result: dict[str, Any] = {
        "workload": workload, "encoding": "fp32", "rate": rate,
        "memory": {
            "adapter_fp32_mib": round(adapter_mib, 3),
            "n_times_adapter_mib": {str(n): round(n * adapter_mib, 1) for n in sizes},
            "paced_updates_per_s": round(pace, 1),
            "strategies": scan,
        },
    }
    human = (f"ingest ({workload}, {rate['payload_bytes']:,} B/update): raw "
             f"{rate['raw_msgs_per_s']:.0f} msg/s, aggregator "
             f"{rate['aggregator_updates_per_s']:.0f} updates/s ({rate['ratio_vs_raw']:.2f}x)")
    if scan:
        human += "; peak growth MiB paced (burst) " + ", ".join(
            f"{s} " + "/".join(f"{v['paced']['peak_growth_mib']:.0f} "
                               f"({v['burst']['peak_growth_mib']:.0f})" for v in per_n.values())
            for s, per_n in scan.items()) + f" at N={'/'.join(map(str, sizes))}"
    if args.burst:
        burst = result["burst"] = measure_burst(port, artifacts, args.burst)
        human += (f"; burst of {burst['updates']}: {burst['accepted']} accepted, peak "
                  f"{burst['peak_above_idle_mib']:.0f} MiB above idle")
    return result, human


def main() -> None:
    """Parse arguments, run (or be a child), print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=_workloads, default=["fmnist-cnn"],
                        help=f"whose adapters the updates carry: one of {', '.join(WORKLOADS)}, "
                             "or several, comma-separated")
    parser.add_argument("--updates", type=int, default=300, help="updates per rate measurement")
    parser.add_argument("--repeats", type=int, default=3, help="raw/aggregator pairs, interleaved")
    parser.add_argument("--memory-n", default="100,300,1000",
                        help="comma-separated fleet sizes for the memory scan ('' to skip)")
    parser.add_argument("--strategies", default="fedavg,fedmedian,trimmed_mean",
                        help="strategies of the memory scan")
    parser.add_argument("--pace-fraction", type=float, default=0.5,
                        help="paced memory runs send at this fraction of the measured rate")
    parser.add_argument("--burst", type=int, default=0,
                        help="also publish this many updates at once and report the peak RSS "
                             "above idle (0: skip)")
    parser.add_argument("--child", choices=("raw", "coordinator"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--federation", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="fedavg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    if args.child == "raw":
        print(json.dumps(_raw_child(args.port, args.federation, args.updates)))
        return
    if args.child == "coordinator":
        print(json.dumps(_coordinator_child(args.port, args.federation, args.updates,
                                            args.artifacts, args.strategy)))
        return
    if args.burst < 0:
        parser.error("--burst must be 0 (skip) or a number of updates")

    quiet_torch()  # build_artifacts imports it
    from transport.broker import Broker

    result: dict[str, Any] = {"benchmark": "ingest", "machine": machine()}
    with Broker(prefer="mosquitto") as broker:
        if broker.kind != "mosquitto":
            raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
        figures = {w: measure(broker.port, w, args) for w in args.workload}
    if len(figures) == 1:  # one workload: its figures at the top level
        only, human = next(iter(figures.values()))
        result.update(only)
    else:
        result["workloads"] = {w: f for w, (f, _) in figures.items()}
        human = "\n".join(h for _, h in figures.values())
    emit(result, human)


def _initial(artifacts: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from protocol.manifest import load_manifest

    return load_file(str(artifacts / load_manifest(artifacts).files["adapter_init"]))


if __name__ == "__main__":
    main()
