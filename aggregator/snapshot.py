"""A consistent, immutable picture of the gateway, made by the coordinator for readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """One closed round as the status page shows it."""

    round: int
    devices: tuple[str, ...]
    samples: float
    bytes_received: int
    duration_s: float
    metrics: dict[str, float]
    closed_at: float  # time.time() when it closed


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    """Everything the status page, /api/status and /metrics read, copied at one instant.

    The coordinator builds a new one on its own thread whenever its state changes and swaps it
    in with one assignment, so HTTP threads never read its internals.
    """

    federation: str
    round: int
    rounds: int
    finished: bool
    mode: str
    strategy: str
    connected: bool
    open_round: int
    open_updates: int
    open_bytes: int
    clients_per_round: int
    min_clients: int
    online: tuple[str, ...] = ()
    rejections: dict[str, int] = field(default_factory=dict)
    # Family facts worth showing, JSON-ready: for DP {"epsilon": ..., "delta": ...,
    # "max_epsilon": ...}; for exact aggregation the residual's rank and truncation error.
    family: dict[str, Any] = field(default_factory=dict)
    history: tuple[RoundSummary, ...] = ()
    # TLS certificate identity (ca, broker, aggregator, device ids) -> ISO 8601 expiry, from
    # edgefl.gateway.certificate_expiry; empty without a gateway folder.
    certificates: dict[str, str] = field(default_factory=dict)
    # What this aggregator process is: "" for a whole aggregator, else its part in a scaled-out
    # deployment ("leader of 4 worker processes", "gateway g1 under an upstream aggregator"...).
    role: str = ""
