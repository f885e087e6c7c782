"""Hierarchical federation over broker bridging: gateway aggregators send their rounds' partial
sums upstream; an upstream aggregator merges them and sends the global back down.

Each gateway runs its own broker and a GatewayTier aggregator: it collects its devices' updates
like a Coordinator, but when its round is complete it seals it and publishes the round's
weighted sum (PartialSum, float64) on fl/v1/<federation>/partial/<gateway>. A bridge on the
gateway's broker forwards that topic to the upstream broker and brings the upstream's retained
global back in under upstream/…; the gateway aggregator moves to its round, then publishes those
same bytes on its broker's global topic for its devices (so none sends an update for a round
the gateway has not opened yet). Upstream, a GatewayMerger is a
Coordinator whose contributors are gateways: merging weighted sums is exact, so the global equals
FedAvg over every device of every gateway (docs/DEPLOY.md, docs/PROTOCOL.md §13).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from aggregator.coordinator import (
    POLL_S,
    Coordinator,
    Rejected,
    RoundRecord,
)
from aggregator.families import sum_restore
from aggregator.registry import check_mergeable
from aggregator.rounds import Contribution, GlobalState
from aggregator.store import OpenRound, StorageError
from protocol import topics
from protocol.codec import DecodeError, decode_global, decode_partial, encode_partial
from protocol.messages import PartialSum, Update
from protocol.tensors import check_finite
from transport import Received, TransportError

logger = logging.getLogger(__name__)


class GatewayTier(Coordinator):
    """A gateway's aggregator under an upstream one: collects its devices' updates, sends each
    complete round upstream as a partial sum, and takes the next global from upstream."""

    def __init__(self, *args: object, gateway_id: str, **kwargs: object) -> None:
        self._final = False  # upstream's last global arrived (read by the constructor too)
        self.gateway_id = gateway_id  # and so is our role, for the status snapshot
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        check_mergeable(self.config, "--upstream")
        self._upstream_topic = topics.upstream_global_topic(self.config.federation)
        self._sealed = self.store.is_sealed(self.round)
        self._global: bytes | None = None  # upstream's global of the open round, as received
        self._last_publish = self.now()

    def _finished(self) -> bool:
        # Upstream decides when the federation ends (this gateway's own --rounds is not used).
        return self._final

    def role(self) -> str:
        return f"gateway {self.gateway_id} under an upstream aggregator"

    def _publish_global(self, final: bool = False) -> None:
        """Relay upstream's global of the open round to this gateway's devices (retained)."""
        self._last_publish = self.now()
        if self._global is not None:
            self.global_bytes = len(self._global)
            self.transport.publish(topics.global_topic(self.config.federation), self._global,
                                   qos=1, retain=True)

    def validate(self, topic: str, payload: bytes) -> Update:
        update = super().validate(topic, payload)
        if self._sealed:
            raise Rejected("stale-round", f"round {self.round} is closed here (its sum went "
                                          "upstream); the next global comes from upstream")
        return update

    def _seal(self) -> None:
        """Close the round here: no more updates, its partial sum goes upstream."""
        self.store.seal(self.round)
        self._sealed = True
        logger.info("round %d sealed with %d updates; partial sum sent upstream", self.round,
                    len(self.open.reported))
        self._send_partial()

    def _send_partial(self) -> None:
        """Publish the sealed round's partial sum (again: upstream drops a copy it has)."""
        acc = sum_restore(self.aggregator.snapshot())
        if acc is None:
            return
        partial = PartialSum(self.config.federation, self.round, self.gateway_id,
                             self.manifest_sha256, acc.weight, acc.count, acc.sums,
                             dict(self.open.metric_sums), self.open.bytes)
        try:
            self.transport.publish(topics.partial_topic(self.config.federation, self.gateway_id),
                                   encode_partial(partial), qos=1)
        except TransportError as exc:  # the republish timer sends it again
            logger.warning("could not send round %d upstream yet: %s", self.round, exc)

    def _take_global(self, message: Received) -> RoundRecord | None:
        """Move to the round an upstream global opens and relay it; the record of our round
        if we had sealed it."""
        try:
            model = decode_global(message.payload)
        except DecodeError as exc:
            logger.warning("ignored a malformed global from upstream: %s", exc)
            return None
        if model.federation != self.config.federation or (
                model.manifest_sha256 != self.manifest_sha256):
            logger.warning("ignored a global of another federation or model version")
            return None
        if model.round < self.round or (model.round == self.round
                                         and message.payload == self._global):
            return None  # an old global, or the open round's again
        self._final = model.final
        if model.round == self.round:  # the open round's global, first seen (or at a restart)
            self._global = message.payload
            self._relay()
            return None
        record = self._record() if self._sealed else None
        if record is None and self.open.reported:
            logger.warning("upstream closed round %d without this gateway's %d updates",
                           self.round, len(self.open.reported))
        following = GlobalState(model.round, model.adapter)
        self._save_state(following, [] if record is None else list(record.devices))
        self.state, self._sealed = following, False
        self.open, self.aggregator = OpenRound(self.round), self.family.open(self.state)
        self._start_clock()
        self._refresh_snapshot()
        self._global = message.payload
        self._relay()
        logger.info("round %d open (global from upstream)", self.round)
        return record

    def _relay(self) -> None:
        try:
            self._publish_global()
        except TransportError as exc:  # the republish timer tries again
            logger.warning("could not relay round %d's global yet: %s", self.round, exc)

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[RoundRecord]:
        """Collect rounds until upstream's final global (or `stop()`)."""
        for topic_filter in (*self._subscriptions(), self._upstream_topic):
            self.transport.subscribe(topic_filter, qos=1)
        if self._sealed:  # restarted after sealing: upstream may not have it yet
            self._send_partial()
        records: list[RoundRecord] = []
        while not stop() and not self._finished():
            message = self.transport.receive(timeout=0 if self._group else POLL_S)
            if message is not None and message.topic == self._upstream_topic:
                self._flush()  # its updates belong to the round before this global
                try:
                    record = self._take_global(message)
                except StorageError as exc:  # unacknowledged: the broker delivers it again
                    self._storage_failed(exc)
                    continue
                self.transport.ack(message)
                if record is not None:
                    records.append(record)
                    if self.on_round is not None:
                        self.on_round(record, self.adapter)
                continue
            if not self._take(message):
                continue
            if self.now() - self._last_publish > self.config.republish_s:
                self._relay()
                if self._sealed:
                    self._send_partial()
            if not self._sealed and self._round_ready():
                try:
                    self._seal()
                except StorageError as exc:
                    self._storage_failed(exc)
        self._flush()
        return records


class GatewayMerger(Coordinator):
    """The upstream aggregator: each round, one partial sum per gateway, merged exactly into
    the global it publishes (the bridges carry it down to every gateway and device)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        check_mergeable(self.config, "--merge-gateways")

    def _subscriptions(self) -> tuple[str, ...]:
        return (topics.partial_filter(self.config.federation),)

    def role(self) -> str:
        gateways = sorted(self.config.allowed_devices or ())
        return f"upstream aggregator of gateways {', '.join(gateways)}"

    def validate(self, topic: str, payload: bytes) -> PartialSum:  # type: ignore[override]
        try:
            federation, _, gateway = topics.parse_device_topic(topic)
            partial = decode_partial(payload)
        except (DecodeError, ValueError) as exc:
            raise Rejected("malformed", str(exc)) from exc
        if partial.federation != self.config.federation or federation != partial.federation:
            raise Rejected("federation", f"partial sum for {partial.federation!r}")
        if partial.gateway_id != gateway:
            raise Rejected("device-mismatch", f"{partial.gateway_id!r} sent on {gateway!r}'s "
                                              "topic")
        allowed = self.config.allowed_devices
        if allowed is not None and gateway not in allowed:
            raise Rejected("unknown-device", f"gateway {gateway}")
        if partial.manifest_sha256 != self.manifest_sha256:
            raise Rejected("manifest", f"{gateway} aggregates another model version")
        if partial.update_id in self._group_ids or self.store.is_accepted(partial.update_id):
            raise Rejected("duplicate", f"{gateway}'s round {partial.round} already counted")
        if partial.round != self.round:
            reason = "stale-round" if partial.round < self.round else "future-round"
            raise Rejected(reason, f"{gateway} sent round {partial.round} in {self.round}")
        if partial.weight > partial.count * self.config.max_samples:
            raise Rejected("tensors", f"{gateway}'s weight {partial.weight:g} exceeds "
                                      f"{partial.count} updates of at most "
                                      f"{self.config.max_samples} samples")
        try:
            self.manifest.check_adapter({k: v.astype(np.float32) for k, v in
                                         partial.sums.items()}, shared_only=True)
            check_finite(partial.sums)
        except ValueError as exc:
            raise Rejected("tensors", str(exc)) from exc
        return partial

    def _contribution(self, update: PartialSum) -> Contribution:  # type: ignore[override]
        # The gateway's mean, in float64: weighted by its weight, the round's running sum gets
        # Σ w·x back to within float64 rounding, so merging stays exact.
        mean = {k: v / update.weight for k, v in update.sums.items()}
        return Contribution(update.gateway_id, mean, self.state.adapter, float(update.weight))
