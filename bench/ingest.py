"""Aggregator ingest rate vs raw Mosquitto throughput, and aggregator peak memory as N grows.

    python -m bench.ingest --workload fmnist-cnn,minilm-fortunes --memory-n '' --burst 1000

`--workload` takes one workload or a comma-separated list (one JSON object either way: several
workloads sit under "workloads"). `--burst N` also publishes N updates at once to a fresh
aggregator and reports its peak RSS above idle: the receive window must hold it under
BURST_TARGET_MIB, and every update must be accepted (nothing dropped). `--workers 0,1,2,4` also
runs the real `edgefl aggregator --workers W` as a child for each W, each run paired with a raw
subscriber run on the same broker, and reports its rate, its ratio to raw and the CPU per update
of its whole process tree (leader and workers); `nW` in that list runs W native workers
(`--worker-kind native`, built by scripts/build_ingest.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
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
START_TIMEOUT_S = 120.0  # `edgefl aggregator` up: round 0's global out, every worker subscribed
EXIT_TIMEOUT_S = 60.0  # from its final global to the leader's exit (it stops its workers first)
EXITED_GRACE_S = 5.0  # how long a global may still arrive after the aggregator exited
SUBSCRIBE_SETTLE_S = 0.5  # a worker records its row right after sending SUBSCRIBE, not on SUBACK
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
    command = [sys.executable, "-m", "bench.ingest", "--child", mode, "--port", str(port),
               "--federation", federation, "--updates", str(len(payloads)),
               "--artifacts", str(artifacts), "--strategy", strategy]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != READY:
        child.kill()
        raise RuntimeError(f"{mode} consumer did not start")
    publisher = _connect(port, f"pub-{federation}")
    started = _publish(publisher, payloads, pace_per_s)
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    publisher.disconnect()
    publisher.loop_stop()
    figures = json.loads(out.strip().splitlines()[-1])
    elapsed = float(figures.pop("done")) - started
    return figures | {"seconds": elapsed, "updates_per_s": len(payloads) / elapsed}


def _connect(port: int, client_id: str) -> Any:
    """A paho MQTT 5 client connected to the local broker, its network loop running."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _publish(publisher: Any, payloads: list[tuple[str, bytes]], pace_per_s: float | None = None
             ) -> float:
    """Publish every payload with QoS 1 (at `pace_per_s`, or all at once); when it started."""
    started = time.monotonic()
    for i, (topic, payload) in enumerate(payloads):
        if pace_per_s:
            time.sleep(max(0.0, started + i / pace_per_s - time.monotonic()))
        publisher.publish(topic, payload, qos=1)
    return started


# -- `edgefl aggregator --workers W`: the real CLI, leader and workers, as a child -------------
def _process_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used so far, all its threads, dead ones included."""
    # Linux's clock id for another process's CPU-time clock (CPUCLOCK_SCHED, as glibc's
    # clock_getcpuclockid makes it): nanoseconds, the same sum that wait4's rusage reports.
    return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (the leader's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _count(db: Path, query: str) -> int | None:
    """`SELECT COUNT(*)` on the aggregator's state database; None while it is not there yet."""
    if not db.exists():  # connecting would create an empty file under the starting leader
        return None
    connection = sqlite3.connect(db, timeout=5)
    try:
        return int(connection.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # the leader has not made the tables yet
        return None
    finally:
        connection.close()


class _GlobalWatcher:
    """Subscribed to a federation's global topic: each global decoded, with its arrival time."""

    def __init__(self, port: int, federation: str) -> None:
        from protocol import topics

        self.globals: queue.Queue[tuple[float, Any]] = queue.Queue()
        subscribed = threading.Event()
        self.client = _connect(port, f"watch-{federation}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.subscribe(topics.global_topic(federation), qos=1)
        if not subscribed.wait(30):
            raise RuntimeError("the global watcher could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from protocol.codec import decode_global

        self.globals.put((time.monotonic(), decode_global(msg.payload)))

    def wait_for(self, round_number: int, final: bool, alive: Callable[[], bool],
                 timeout: float) -> float:
        """When the global of `round_number` (final or not) arrived; `alive()` false: give up."""
        deadline, exited = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                arrived, model = self.globals.get(timeout=0.2)
            except queue.Empty:
                # The leader may exit as soon as the broker has its final global, before the
                # broker has passed it on to us: give up only a while after it is gone.
                if not alive():
                    exited = exited or time.monotonic()
                    if time.monotonic() - exited > EXITED_GRACE_S:
                        raise RuntimeError("the aggregator exited early") from None
                continue
            if model.round == round_number and model.final == final:
                return arrived
        raise RuntimeError(f"no global of round {round_number} within {timeout:.0f} s")

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def _wait_exit(child: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Reap the child: its exit code and the CPU seconds of it and every child it reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # wait4's rusage is the child's own plus that of the children it waited for: the
        # leader waits for its workers (Supervisor.stop) before it exits, so they are in it.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
            return child.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    child.kill()
    child.wait()
    raise RuntimeError(f"the aggregator did not exit within {timeout:.0f} s of its final global")


def run_cli(port: int, payloads: list[tuple[str, bytes]], federation: str, artifacts: Path,
            workers: str) -> dict[str, Any]:
    """Start `edgefl aggregator --workers W` for one round of every payload, publish them (QoS 1)
    and time until its final global reaches a subscriber; check it accepted them all.
    `workers` is W, or nW for W native workers (--worker-kind native)."""
    native = workers.startswith("n")
    count = int(workers.removeprefix("n"))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-cli-") as tmp:
        state, log_path = Path(tmp) / "state", Path(tmp) / "aggregator.log"
        db = state / federation / "aggregator.sqlite"
        n = str(len(payloads))
        command = [sys.executable, "-m", "edgefl", "aggregator", "--host", "127.0.0.1",
                   "--port", str(port), "--federation", federation, "--artifacts",
                   str(artifacts), "--rounds", "1", "--clients-per-round", n,
                   "--min-clients", n, "--deadline", str(CHILD_TIMEOUT_S), "--state-dir",
                   str(state), "--workers", str(count)]
        if native:
            command += ["--worker-kind", "native"]
        watcher = _GlobalWatcher(port, federation)
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            return _drive_cli(port, payloads, federation, count, child, watcher, db, log_path)
        except Exception as exc:
            if child.returncode is None:
                child.kill()
                child.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"edgefl aggregator --workers {workers}: {exc}\n{tail}") from exc
        finally:
            watcher.stop()


def _drive_cli(port: int, payloads: list[tuple[str, bytes]], federation: str, workers: int,
               child: subprocess.Popen[bytes], watcher: _GlobalWatcher, db: Path,
               log_path: Path) -> dict[str, Any]:
    """run_cli's measurement, once the child is started: wait until ready, publish, time, check."""
    def alive() -> bool:  # without reaping it (as Popen.poll would): wait4 needs its rusage
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    # Ready: round 0's global is out (the leader, or the single aggregator after subscribing on
    # the same connection, so its subscription is live) and every worker has its row.
    watcher.wait_for(0, False, alive, START_TIMEOUT_S)
    deadline = time.monotonic() + START_TIMEOUT_S
    while workers and _count(db, "SELECT COUNT(*) FROM worker_rejections") != workers:
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError("the workers did not all subscribe")
        time.sleep(0.05)
    time.sleep(SUBSCRIBE_SETTLE_S if workers else 0.1)
    processes = [child.pid, *_children(child.pid)]
    if len(processes) != 1 + workers:
        raise RuntimeError(f"expected the leader and {workers} workers, found {processes}")
    # What the processes spent starting up (imports, connecting) is not the round's.
    idle_cpu = sum(_process_cpu_s(pid) for pid in processes)
    publisher = _connect(port, f"pub-{federation}")
    started = _publish(publisher, payloads)
    finished = watcher.wait_for(1, True, alive, CHILD_TIMEOUT_S)
    publisher.disconnect()
    publisher.loop_stop()
    code, total_cpu = _wait_exit(child, EXIT_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"exit code {code}")
    if "restarting it" in log_path.read_text(errors="replace"):  # a new process: CPU unknown
        raise RuntimeError("a worker died and was restarted")
    accepted = _count(db, "SELECT COUNT(*) FROM accepted")
    if accepted != len(payloads):
        raise RuntimeError(f"accepted {accepted} of {len(payloads)} updates")
    elapsed = finished - started
    return {"seconds": elapsed, "updates_per_s": len(payloads) / elapsed, "accepted": accepted,
            "processes": len(processes), "cpu_s": total_cpu - idle_cpu}


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


def _worker_counts(text: str) -> list[str]:
    """Parse --workers: a comma-separated list of worker counts (0: the single process; nW: W
    native workers)."""
    counts = [w.strip() for w in text.split(",") if w.strip()]
    if (not all(w.removeprefix("n").isdigit() for w in counts) or "n0" in counts
            or len(set(counts)) != len(counts)):
        raise argparse.ArgumentTypeError(f"distinct worker counts ≥ 0 (nW: W native workers), "
                                         f"comma-separated; got {text!r}")
    return counts


def measure_workers(port: int, artifacts: Path, updates: int, repeats: int, counts: list[str]
                    ) -> dict[str, dict[str, Any]]:
    """Raw subscriber and `edgefl aggregator --workers W`: `repeats` interleaved pairs per W."""
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {w: [] for w in counts}
    # Repeat-major: every W gets a pair before any gets its second, so a load change on the
    # machine spreads over the counts instead of landing on one of them.
    for i in range(repeats):
        for w in counts:
            federation = f"bench-{uuid.uuid4().hex[:8]}"  # fresh: no retained global, no session
            payloads = make_payloads(artifacts, federation, updates, seed=i)
            raw = run_once(port, "raw", payloads, federation, artifacts)
            runs[w].append((raw, run_cli(port, payloads, federation, artifacts, w)))
    return {w: _worker_figures(pairs, updates) for w, pairs in runs.items()}


def _worker_figures(pairs: list[tuple[dict[str, Any], dict[str, Any]]], updates: int
                    ) -> dict[str, Any]:
    """One worker count's medians and runs, from its (raw, cli) pairs."""
    raw_rates = [raw["updates_per_s"] for raw, _ in pairs]
    cli_rates = [cli["updates_per_s"] for _, cli in pairs]
    ratios = [c / r for r, c in zip(raw_rates, cli_rates, strict=True)]
    # The whole tree's CPU over the round: leader and workers, each from ready to exit.
    cpu = [cli["cpu_s"] / updates * 1e6 for _, cli in pairs]
    return {
        "processes": pairs[0][1]["processes"],
        "raw_msgs_per_s": round(median(raw_rates), 1),
        "aggregator_updates_per_s": round(median(cli_rates), 1),
        "ratio_vs_raw": round(median(ratios), 4),
        "raw_runs": [round(r, 1) for r in raw_rates],
        "aggregator_runs": [round(r, 1) for r in cli_rates],
        "ratio_runs": [round(r, 4) for r in ratios],
        "accepted_runs": [cli["accepted"] for _, cli in pairs],
        "raw_cpu_us_per_msg": round(median([raw["cpu_s"] / updates * 1e6 for raw, _ in pairs])),
        "aggregator_cpu_us_per_update": round(median(cpu)),
        "aggregator_cpu_runs": [round(c) for c in cpu],
    }


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
    if args.workers:
        rows = result["workers"] = measure_workers(port, artifacts, args.updates, args.repeats,
                                                   args.workers)
        human += (f"; workers {'/'.join(rows)}: aggregator "
                  + "/".join(f"{r['aggregator_updates_per_s']:.0f}" for r in rows.values())
                  + " updates/s vs raw "
                  + "/".join(f"{r['raw_msgs_per_s']:.0f}" for r in rows.values()) + " msg/s ("
                  + "/".join(f"{r['ratio_vs_raw']:.2f}" for r in rows.values()) + "x), CPU "
                  + "/".join(f"{r['aggregator_cpu_us_per_update']}" for r in rows.values())
                  + " µs/update")
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
    parser.add_argument("--workers", type=_worker_counts, default=[],
                        help="also measure `edgefl aggregator --workers W` for each W of this "
                             "comma-separated list (0: one process; nW: W native workers), "
                             "paired with raw runs ('' to skip)")
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
