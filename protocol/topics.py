"""MQTT topic names: the only place topic strings are built or parsed."""

from __future__ import annotations

# Version in the root so a v2 protocol can run beside v1 on the same broker.
ROOT = "fl/v1"


def _check_segment(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} must be non-empty and free of '/', '+', '#'")
    return value


def global_topic(federation: str) -> str:
    """Retained: the current global adapter and the round it opens."""
    return f"{ROOT}/{_check_segment(federation, 'federation')}/global"


def residual_topic(federation: str) -> str:
    """Retained: the cumulative residual (exact aggregation), for devices that must catch up."""
    return f"{ROOT}/{_check_segment(federation, 'federation')}/residual"


def _device_topic(federation: str, kind: str, device_id: str) -> str:
    return (f"{ROOT}/{_check_segment(federation, 'federation')}/{kind}/"
            f"{_check_segment(device_id, 'device id')}")


def _all_devices(federation: str, kind: str) -> str:
    return f"{ROOT}/{_check_segment(federation, 'federation')}/{kind}/+"


def update_topic(federation: str, device_id: str) -> str:
    """A device's update for the open round (device -> aggregator, QoS 1)."""
    return _device_topic(federation, "update", device_id)


def update_filter(federation: str) -> str:
    """Subscription filter matching every device's update topic."""
    return _all_devices(federation, "update")


def shared_update_filter(federation: str, group: str) -> str:
    """MQTT 5 shared subscription to every device's update: the broker hands each update to
    one member of `group` (the aggregator's worker processes)."""
    return f"$share/{_check_segment(group, 'group')}/{update_filter(federation)}"


def partial_topic(federation: str, gateway_id: str) -> str:
    """A gateway aggregator's closed round as a partial sum (gateway -> upstream, QoS 1; a
    broker bridge forwards it to the upstream broker)."""
    return _device_topic(federation, "partial", gateway_id)


def partial_filter(federation: str) -> str:
    """Subscription filter matching every gateway's partial-sum topic."""
    return _all_devices(federation, "partial")


def status_topic(federation: str, device_id: str) -> str:
    """Retained: a device's online/offline status (offline is its MQTT last will)."""
    return _device_topic(federation, "status", device_id)


def status_filter(federation: str) -> str:
    """Subscription filter matching every device's status topic."""
    return _all_devices(federation, "status")


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """Split an update, status or partial-sum topic into (federation, kind, device id)."""
    parts = topic.split("/")
    kinds = ("update", "status", "partial")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or parts[3] not in kinds:
        raise ValueError(f"not a device topic: {topic!r}")
    return parts[2], parts[3], parts[4]


def upstream_global_topic(federation: str) -> str:
    """Where a gateway broker's bridge delivers the upstream aggregator's global: the gateway
    aggregator takes it from here and publishes it on global_topic once it has moved to its
    round, so its devices never send an update it cannot place yet."""
    return UPSTREAM_PREFIX + global_topic(federation)


UPSTREAM_PREFIX = "upstream/"


def bridge_topics() -> tuple[str, ...]:
    """The `topic` lines of a gateway broker's bridge to the upstream broker (Mosquitto syntax:
    pattern, direction, QoS, local prefix, remote prefix): every federation's partial sums go
    up; the upstream globals come down to upstream_global_topic."""
    return (f"{ROOT}/+/partial/+ out 1",
            f"+/global in 1 {UPSTREAM_PREFIX}{ROOT}/ {ROOT}/")
