"""Native ingest workers (aggregator/native, `edgefl-ingest`): what IngestWorker does, in C++, for
`edgefl aggregator --workers N --worker-kind native`. The leader stays the Python MergingLeader;
each worker reads a spec file the leader writes (this module) and shares the state database.
Plain MQTT or TLS with the worker's own certificate; signed updates when the gateway has keys."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Protocol

from aggregator.config import AggregatorConfig
from aggregator.coordinator import BATCH_MAX
from aggregator.registry import check_mergeable
from aggregator.store import DB_FILE
from aggregator.workers import share_group
from protocol import topics
from protocol.manifest import Manifest
from protocol.tensors import is_personal

REPO = Path(__file__).resolve().parents[1]
BUILT = REPO / ".cache" / "native-ingest" / "edgefl-ingest"  # by scripts/build_ingest.sh
SESSION_EXPIRY_S = 3600  # as transport.mqtt.MqttTransport's persistent sessions
RECEIVE_MAXIMUM = 65_535


class TlsPaths(Protocol):
    """A worker's TLS files (transport.mqtt.TlsFiles, which only transport/ imports)."""

    ca: Path
    cert: Path | None
    key: Path | None


def check_native(config: AggregatorConfig, manifest: Manifest | None = None,
                 option: str = "--worker-kind") -> None:
    """Refuse what the native worker does not do, before anything starts (`option` names the
    command's option in the message; `manifest`, when known, must have float32 tensors).

    Raises:
        ValueError: its one-line reason.
    """
    check_mergeable(config, f"{option} native")
    if config.clip_norm is not None:
        raise ValueError(f"{option} native does not clip updates: drop --clip-norm or use "
                         f"{option} python")
    odd = [s.name for s in manifest.tensors if s.dtype != "float32"] if manifest else []
    if odd:
        raise ValueError(f"{option} native folds float32 adapters; {odd[0]} is not")
    if binary() is None:
        raise ValueError(f"the native ingest worker is not built ({BUILT}, or edgefl-ingest on "
                         "PATH): run bash scripts/build_ingest.sh")


def binary() -> Path | None:
    """edgefl-ingest: the one scripts/build_ingest.sh built in this checkout, else on PATH."""
    if BUILT.exists():
        return BUILT
    found = shutil.which("edgefl-ingest")
    return None if found is None else Path(found)


def write_spec(folder: Path, index: int, config: AggregatorConfig, manifest: Manifest, host: str,
               port: int, tls: TlsPaths | None = None, signing_registry: Path | None = None
               ) -> Path:
    """The spec file of worker `index` (its settings, as edgefl-ingest reads them): with `tls`,
    the worker's own TLS identity; with `signing_registry`, updates must be signed."""
    f, name = config.federation, f"w{index}"
    spec = {
        "federation": f, "worker": name, "client_id": f"aggregator-{f}-{name}",
        "share_filter": topics.shared_update_filter(f, share_group(f)),
        "host": host, "port": port, "state_db": str(Path(folder) / DB_FILE),
        "manifest_sha256": manifest.sha256,
        "tensors": [{"name": s.name, "shape": list(s.shape)} for s in manifest.tensors
                    if not is_personal(s.name)],
        "max_samples": config.max_samples, "rounds": config.rounds, "batch_max": BATCH_MAX,
        "session_expiry_s": SESSION_EXPIRY_S, "receive_maximum": RECEIVE_MAXIMUM,
        "allowed_devices": (None if config.allowed_devices is None
                            else sorted(config.allowed_devices)),
        "signing_registry": None if signing_registry is None else str(signing_registry),
        "tls": None if tls is None else {"ca": str(tls.ca), "cert": str(tls.cert or ""),
                                         "key": str(tls.key or "")},
        # Its INFO lines (each accepted update) only when ours show (`-v`), as a Python worker.
        "verbose": logging.getLogger("aggregator").isEnabledFor(logging.INFO),
    }
    path = Path(folder) / f"native-{name}.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def command(spec: Path) -> list[str]:
    """The command line of a native worker."""
    # Gone since check_native: starting BUILT fails, and the supervisor logs it and retries.
    return [str(binary() or BUILT), str(spec)]
