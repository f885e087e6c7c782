"""Device agent: wait for the global adapter, train locally, publish the update, repeat."""

from __future__ import annotations

import json
import logging
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file, save_file

from edge_client.data import LocalTask
from edge_client.trainer import Trainer, train_local
from protocol import topics
from protocol.codec import (
    DecodeError,
    decode_global,
    decode_residual,
    encode_status,
    encode_update,
)
from protocol.messages import (
    GlobalModel,
    ResidualModel,
    TrainConfig,
    Update,
    check_task_name,
    new_update_id,
)
from protocol.residual import dense_residual
from protocol.signing import sign_payload
from protocol.tensors import TensorDict, is_personal, shared
from transport import Transport, TransportError

logger = logging.getLogger(__name__)

POLL_S = 0.5
# Pending-update file: magic, round (u64), then (length u64, payload) per task slot.
_PENDING_MAGIC = b"EFP2"


@dataclass
class DeviceState:
    """What a device must remember across restarts: the last round it reported."""

    last_round: int = -1

    @classmethod
    def load(cls, path: Path | None) -> DeviceState:
        """Read the state file, or start fresh."""
        if path is None or not path.exists():
            return cls()
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path | None) -> None:
        """Write atomically, so a crash mid-write keeps the previous state."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_round": self.last_round}))
        tmp.replace(path)


class DeviceAgent:
    """One emulated or real device. `run()` blocks until the federation's final message.

    A device has one local dataset (`inputs`, `labels`), or with `tasks` several named ones
    (FL-TAC): it then trains one adapter per task each round and sends one update per task.
    """

    def __init__(
        self,
        device_id: str,
        federation: str,
        trainer: Trainer,
        inputs: np.ndarray | None,
        labels: np.ndarray | None,
        transport: Transport,
        state_dir: Path | None = None,
        seed: int = 0,
        signing_key: Ed25519PrivateKey | None = None,
        tasks: Sequence[LocalTask] = (),
    ) -> None:
        if tasks:
            if inputs is not None or labels is not None:
                raise ValueError("give either inputs and labels or tasks, not both")
            names = [task.name for task in tasks]
            if len(set(names)) != len(names) or "" in names:
                raise ValueError(f"task slots need distinct non-empty names, got {names}")
            for name in names:
                check_task_name(name)
        elif inputs is None or labels is None:
            raise ValueError("a device needs inputs and labels (or tasks)")
        self.device_id, self.federation, self.trainer = device_id, federation, trainer
        self.tasks = list(tasks) or [LocalTask("", inputs, labels)]  # type: ignore[arg-type]
        self.transport = transport
        self.state_path = Path(state_dir) / f"{device_id}.json" if state_dir else None
        self.pending_path = Path(state_dir) / f"{device_id}.pending" if state_dir else None
        self.state = DeviceState.load(self.state_path)
        # This round's update(s), kept until a later round's global shows the round closed.
        self.pending = self._load_pending()
        self._acked = 0  # pending payloads the broker has acked since the last (re)send
        self.problem: str | None = None  # what keeps us from training, as our status says
        self._status_published = False
        self.rng = np.random.default_rng(seed)
        self.signing_key = signing_key
        self.state_dir = Path(state_dir) if state_dir else None
        # Personal tensors (CoLoRA cores), one set per task slot: each task gets its own core.
        self.personal = {task.name: self._load_personal(task.name) for task in self.tasks}
        self.rounds_trained = 0
        # Exact aggregation: the residual our frozen weights hold (R_t, per layer) and its t.
        self.residual_path = Path(state_dir) / f"{device_id}.residual.safetensors" if state_dir \
            else None
        self.residual_round, self.residual = self._load_residual()
        self._catch_up: ResidualModel | None = None  # newest message of the residual topic
        self._waiting: GlobalModel | None = None  # a global that waits for that message
        self._subscribed_residual = False

    @staticmethod
    def will(federation: str, device_id: str) -> tuple[str, bytes]:
        """The MQTT last will the transport must register before connecting."""
        return topics.status_topic(federation, device_id), encode_status(False, device_id)

    def _latest_global(self) -> GlobalModel | None:
        """Newest decodable global message waiting in the inbox (older ones are superseded).

        Residual catch-ups arriving meanwhile are kept; one that a waiting global needed
        hands that global back for another try.
        """
        latest: GlobalModel | None = None
        residual_topic = topics.residual_topic(self.federation)
        while True:
            message = self.transport.receive(timeout=0 if latest else POLL_S)
            if message is None:
                break
            try:
                if message.topic == residual_topic:
                    self._catch_up = decode_residual(message.payload)
                    continue
                candidate = decode_global(message.payload)
            except DecodeError as exc:
                logger.warning("%s: ignored malformed message on %s: %s", self.device_id,
                               message.topic, exc)
                continue
            if latest is None or candidate.round >= latest.round:
                latest = candidate
        if latest is None and self._waiting is not None and self._catch_up is not None \
                and self._catch_up.round == self._waiting.round:
            latest, self._waiting = self._waiting, None
        return latest

    def handle_global(self, message: GlobalModel) -> list[Update]:
        """Train on one global message; return one update per local task (none: nothing to do)."""
        if message.manifest_sha256 != self.trainer.manifest.sha256:
            return []  # run() reports it, once, on the status topic and in the log
        if message.final or message.round <= self.state.last_round:
            return []
        if not self._prepare(message):
            return []
        updates = []
        for task in self.tasks:
            update = self._train_task(message, task)
            if update is not None:
                updates.append(update)
        return updates

    def _prepare(self, message: GlobalModel) -> bool:
        """Set the program up as the global asks (residual, class mask); False: cannot."""
        if message.residual:
            # Exact aggregation: the frozen weights must hold R_t, the cumulative residual.
            if not self._sync_residual(message):
                return False
            try:
                self.trainer.set_base_delta(self.residual)
            except (NotImplementedError, KeyError, ValueError) as exc:
                logger.error("%s: cannot apply the global's base residual (%s); skipping round %d",
                             self.device_id, exc, message.round)
                return False
        if message.task_classes is not None:
            # Continual learning: the other classes' logits are masked, so training on the
            # current task does not push down the classes learnt before (or still to come).
            try:
                self.trainer.set_class_mask(message.task_classes)
            except (NotImplementedError, ValueError) as exc:
                logger.error("%s: cannot mask logits to task %s's classes (%s); skipping round %d",
                             self.device_id, message.task_index, exc, message.round)
                return False
        self.trainer.set_learning_rate(message.train.learning_rate)
        return True

    def _train_task(self, message: GlobalModel, task: LocalTask) -> Update | None:
        """Train one task slot from its start adapter; None if it holds no data for the task."""
        inputs, labels = task.inputs, task.labels
        if message.task_classes is not None:
            # The device's data of the current task: in a real deployment the examples that
            # arrived during it; emulated devices hold their whole stream and filter it.
            keep = np.isin(labels, message.task_classes)
            inputs, labels = inputs[keep], labels[keep]
        if len(labels) == 0:  # nothing of the current task, or a tiny device's empty task
            logger.info("%s: no examples for task slot %r; sitting round %d out",
                        self.device_id, task.name, message.round)
            return None
        start = message.start_adapter(self.device_id, task.name)
        self.trainer.set_adapter(start | self.personal[task.name])
        result = train_local(self.trainer, inputs, labels, message.train.local_steps, self.rng)
        trained = self.trainer.get_adapter()
        # Personal tensors (CoLoRA cores) stay here: kept on disk, never uploaded.
        self.personal[task.name] = {k: v for k, v in trained.items() if is_personal(k)}
        self._save_personal(task.name)
        adapter = shared(trained)
        # Compact encodings quantise what is sent; the change from the global is small and
        # quantises with far less error than the adapter itself, so send that instead.
        compact = message.train.update_encoding != "fp32" or message.train.update_topk
        if compact:
            adapter = {k: v - start[k] for k, v in adapter.items()}
        metrics = {"train_loss": result.mean_loss, "train_accuracy": result.accuracy}
        if not all(np.isfinite(list(metrics.values()))):  # diverged: the protocol wants finite
            logger.warning("%s: training of slot %r diverged (%s); sitting round %d out",
                           self.device_id, task.name, metrics, message.round)
            return None
        return Update(
            federation=self.federation, round=message.round, device_id=self.device_id,
            manifest_sha256=self.trainer.manifest.sha256, num_samples=result.samples,
            update_id=new_update_id(self.device_id, message.round, task.name),
            adapter=adapter, is_delta=bool(compact), task=task.name, metrics=metrics,
        )

    def encode(self, update: Update, train: TrainConfig) -> bytes:
        """Wire bytes of an update: the federation's encoding, signed if we hold a key."""
        payload = encode_update(update, encoding=train.update_encoding, topk=train.update_topk)
        if self.signing_key is not None:
            payload = sign_payload(self.signing_key, self.device_id, payload)
        return payload

    # -- exact aggregation: the residual folded into the frozen weights ----------------------
    def _take_final_step(self, message: GlobalModel) -> None:
        """Add the final global's residual step, so the frozen weights kept are the final model's.

        Only when level with the round before it (a step away); a device further behind would
        need the catch-up copy, which is not worth waiting for once the federation is over.
        """
        if (message.residual and message.manifest_sha256 == self.trainer.manifest.sha256
                and self.residual_round == message.round - 1):
            self._sync_residual(message)

    def _sync_residual(self, message: GlobalModel) -> bool:
        """Bring our residual level with the global's round t; False: wait for a catch-up.

        Level with t − 1, we add the global's step (small, exact); otherwise we take R_t from
        the residual topic, subscribing only while we need it (it can be megabytes).
        """
        t = message.round
        if self.residual_round == t:
            return True
        try:
            if self.residual_round == t - 1:
                step = dense_residual(message.residual_step)
                self._set_residual(t, {layer: self.residual.get(layer, 0) + step.get(layer, 0)
                                       for layer in self.residual.keys() | step.keys()})
                return True
            if self._catch_up is not None and self._catch_up.round == t:
                self._set_residual(t, dense_residual(self._catch_up.residual))
                if self._catch_up.truncation_error > 0:
                    logger.warning("%s: the residual of round %d came truncated (relative "
                                   "error %.2g)", self.device_id, t,
                                   self._catch_up.truncation_error)
                self._stop_catching_up()
                return True
        except ValueError as exc:  # shapes that do not fit this model: not ours to train
            logger.error("%s: unusable residual for round %d (%s)", self.device_id, t, exc)
            return False
        self._waiting = message
        if not self._subscribed_residual:
            logger.info("%s: at residual round %d, fetching round %d's", self.device_id,
                        self.residual_round, t)
            self.transport.subscribe(topics.residual_topic(self.federation), qos=1)
            self._subscribed_residual = True
        return False

    def _stop_catching_up(self) -> None:
        if self._subscribed_residual:
            self.transport.unsubscribe(topics.residual_topic(self.federation))
            self._subscribed_residual = False
        self._catch_up = None

    def _set_residual(self, round_number: int, residual: dict[str, np.ndarray]) -> None:
        """Adopt R_round and keep it on disk, so a restart does not need a catch-up."""
        self.residual_round = round_number
        self.residual = {k: np.asarray(v, np.float32) for k, v in residual.items()}
        if self.residual_path is None:
            return
        self.residual_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.residual_path.with_suffix(".tmp")
        save_file(self.residual, str(tmp), metadata={"round": str(round_number)})
        tmp.replace(self.residual_path)

    def _load_residual(self) -> tuple[int, dict[str, np.ndarray]]:
        """(t, R_t) from disk; a fresh device holds R_0 = 0."""
        if self.residual_path is None or not self.residual_path.exists():
            return 0, {}
        from safetensors import safe_open

        with safe_open(str(self.residual_path), "np") as stored:
            round_number = int((stored.metadata() or {}).get("round", "0"))
        return round_number, load_file(str(self.residual_path))

    # -- personal tensors survive restarts ------------------------------------------------
    def personal_path(self, task: str = "") -> Path | None:
        """File of a task slot's personal tensors (None without a state folder)."""
        return personal_file(self.state_dir, self.device_id, task) if self.state_dir else None

    def _load_personal(self, task: str) -> TensorDict:
        path = self.personal_path(task)
        if path is not None and path.exists():
            return load_file(str(path))
        return {k: v for k, v in self.trainer.get_adapter().items() if is_personal(k)}

    def _save_personal(self, task: str) -> None:
        path = self.personal_path(task)
        if path is None or not self.personal[task]:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(self.personal[task], str(tmp))
        tmp.replace(path)

    # -- a round's update is kept (surviving restarts and outages) until the round closes ---
    def _save_pending(self, round_number: int, payloads: list[bytes]) -> None:
        """Keep a round's payloads (one per task slot) to send, atomically on disk."""
        self.pending, self._acked = (round_number, list(payloads)), 0
        if self.pending_path is not None:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.pending_path.with_suffix(".tmp")
            tmp.write_bytes(_PENDING_MAGIC + round_number.to_bytes(8, "big") + b"".join(
                len(p).to_bytes(8, "big") + p for p in payloads))
            tmp.replace(self.pending_path)

    def _load_pending(self) -> tuple[int, list[bytes]] | None:
        if self.pending_path is None or not self.pending_path.exists():
            return None
        data = self.pending_path.read_bytes()
        if not data.startswith(_PENDING_MAGIC):  # the single-payload file of older versions
            return int.from_bytes(data[:8], "big"), [data[8:]]
        round_number, cursor, payloads = int.from_bytes(data[4:12], "big"), 12, []
        while cursor + 8 <= len(data):
            length = int.from_bytes(data[cursor : cursor + 8], "big")
            payloads.append(data[cursor + 8 : cursor + 8 + length])
            cursor += 8 + length
        return round_number, payloads

    def _clear_pending(self) -> None:
        self.pending, self._acked = None, 0
        if self.pending_path is not None:
            self.pending_path.unlink(missing_ok=True)

    def note_round(self, round_number: int) -> None:
        """A global of `round_number` arrived: resend the kept update if that round is still
        open, forget it once a later round is."""
        if self.pending is None:
            return
        kept_round, payloads = self.pending
        if round_number == kept_round:
            # A broker crash loses the updates it had queued; the aggregator republishes the
            # open round's global, so sending again on each copy delivers ours eventually
            # (same update_id: the aggregator drops the copies it already counted).
            self._acked = 0
        elif round_number > kept_round:
            if self._acked < len(payloads):
                logger.warning("%s: dropping the unsent update of round %d: round %d is open",
                               self.device_id, kept_round, round_number)
            self._clear_pending()
        # An earlier round's global (say, an old retained copy on a restored broker) changes
        # nothing: our round is not closed.

    def flush_pending(self) -> bool:
        """Send the kept payloads the broker has not acked yet; True when none is left to send."""
        if self.pending is None:
            return True
        round_number, payloads = self.pending
        while self._acked < len(payloads):
            if not self.transport.connected:  # publishing while paho reconnects can hang it
                return False
            try:
                self.transport.publish(topics.update_topic(self.federation, self.device_id),
                                       payloads[self._acked], qos=1)
            except TransportError as exc:
                logger.warning("%s: update of round %d not sent yet (%s); kept on disk",
                               self.device_id, round_number, exc)
                return False
            self._acked += 1
        return True

    # -- status: online, and anything that keeps us from training ---------------------------
    def _check_model(self, message: GlobalModel) -> bool:
        """Whether the global is for our model version; say so when that changes."""
        ours = self.trainer.manifest.sha256
        problem = None if message.manifest_sha256 == ours else "manifest"
        if problem != self.problem:
            if problem is not None:
                logger.error("%s: the global is for another model version (manifest %s, ours "
                             "%s): not training until this device gets matching artifacts",
                             self.device_id, message.manifest_sha256[:12], ours[:12])
            else:
                logger.warning("%s: the global matches our model version again; training",
                               self.device_id)
            self.problem, self._status_published = problem, False
        self._publish_status()
        return problem is None

    def _publish_status(self) -> None:
        """Publish our retained status (online, with any problem) unless already done."""
        if self._status_published or not self.transport.connected:
            return  # never publish while paho reconnects; the next global tries again
        try:
            self.transport.publish(topics.status_topic(self.federation, self.device_id),
                                   encode_status(True, self.device_id, problem=self.problem),
                                   qos=1, retain=True)
        except TransportError as exc:
            logger.warning("%s: status not published yet (%s)", self.device_id, exc)
            return
        self._status_published = True

    def run(self, stop: threading.Event | None = None) -> int:
        """Connect, announce, and serve rounds until the final global message; return rounds."""
        stop = stop or threading.Event()
        self.transport.start()
        self.transport.subscribe(topics.global_topic(self.federation), qos=1)
        self._publish_status()
        try:
            while not stop.is_set():
                message = self._latest_global()
                if message is None:
                    self.flush_pending()  # whatever the broker has not acked yet
                    continue
                if message.final:  # nothing kept can count any more
                    self._clear_pending()
                    self._take_final_step(message)
                    logger.info("%s: federation finished at round %d", self.device_id,
                                message.round)
                    break
                if not self._check_model(message):
                    continue
                self.note_round(message.round)
                self.flush_pending()  # the open round's update again, if we hold one
                self._serve(message)
        finally:
            # Clean shutdown: say offline ourselves (the will only fires on a lost connection).
            if self.transport.connected:
                try:
                    self.transport.publish(topics.status_topic(self.federation, self.device_id),
                                           encode_status(False, self.device_id), qos=1,
                                           retain=True)
                except Exception as exc:  # broker already gone: the will covers it
                    logger.debug("%s: could not publish offline status: %s", self.device_id, exc)
            self.transport.stop()
        return self.rounds_trained

    def _serve(self, message: GlobalModel) -> None:
        """Train on a new round's global and send (or keep, to send later) the update(s)."""
        updates = self.handle_global(message)
        if not updates:
            return
        # On disk before the first send attempt: a crash or an outage from here on still
        # delivers this round's work once the device is back, if the round is still open.
        self._save_pending(message.round, [self.encode(u, message.train) for u in updates])
        self.state.last_round = message.round
        self.state.save(self.state_path)
        self.rounds_trained += 1
        sent = self.flush_pending()
        logger.info("%s (%s): %s round %d update(s), loss %s", self.device_id,
                    self.trainer.backend, "sent" if sent else "queued", message.round,
                    ", ".join(f"{u.metrics['train_loss']:.3f}" for u in updates))


def personal_file(state_dir: Path, device_id: str, task: str = "") -> Path:
    """Where a device keeps a task slot's personal tensors (`<id>.personal.safetensors` alone)."""
    return Path(state_dir) / f"{device_id}.{task + '.' if task else ''}personal.safetensors"


def device_seed(device_id: str) -> int:
    """Stable per-device seed (Python's hash() is salted per process)."""
    return zlib.crc32(device_id.encode())
