"""The one strategy registry: strategy name -> round-aggregator family, with the checks that
refuse combinations which would silently break, each as one clear line (ValueError)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from aggregator.config import AggregatorConfig
from aggregator.families import (
    BufferedFamily,
    DPFamily,
    ExactFamily,
    FedBuffFamily,
    FLTACFamily,
    StreamingFamily,
)
from aggregator.robust import fedmedian, trim_count, trimmed_mean
from aggregator.rounds import Family
from protocol.manifest import Manifest
from protocol.tensors import is_personal

# Exact aggregation's lora_A / lora_B naming: a residual needs both factors of a layer.
_A, _B = ".lora_A.weight", ".lora_B.weight"


def _streaming(config: AggregatorConfig, manifest: Manifest) -> Family:
    return StreamingFamily()


def _median(config: AggregatorConfig, manifest: Manifest) -> Family:
    return BufferedFamily(fedmedian)


def _trimmed(config: AggregatorConfig, manifest: Manifest) -> Family:
    if trim_count(config.trim_beta, config.min_clients) < 1:
        need = next(n for n in range(1, 10_000) if trim_count(config.trim_beta, n) >= 1)
        raise ValueError(
            f"trimmed_mean with --trim-beta {config.trim_beta:g} trims nothing from a round of "
            f"{config.min_clients} updates: set --min-clients to at least {need}, or raise "
            f"--trim-beta (β·min_clients must be ≥ 1)")
    return BufferedFamily(partial(trimmed_mean, beta=config.trim_beta))


def _dp(config: AggregatorConfig, manifest: Manifest) -> Family:
    if not config.clip_norm or config.dp_noise_multiplier is None:
        raise ValueError("dp-fedavg needs --clip-norm and --dp-noise")
    if config.dp_noise_multiplier <= 0:
        raise ValueError("dp-fedavg needs a positive --dp-noise (σ = 0 gives no privacy)")
    return DPFamily(config.clip_norm, config.dp_noise_multiplier, float(config.clients_per_round),
                    config.dp_delta, config.dp_max_epsilon)


def _exact(config: AggregatorConfig, manifest: Manifest) -> Family:
    names = [spec.name for spec in manifest.tensors]
    personal = sorted(n for n in names if is_personal(n))
    if personal:
        raise ValueError(
            f"{config.strategy} folds a residual B·A into frozen weights, but workload "
            f"{manifest.workload} has personal tensors ({personal[0]}, …) between A and B "
            "(CoLoRA): use --strategy colora or fedavg")
    layers = sorted(n[: -len(_A)] for n in names if n.endswith(_A) and n[: -len(_A)] + _B in names)
    if not layers:
        raise ValueError(f"{config.strategy} needs LoRA layers (lora_A/lora_B); "
                         f"workload {manifest.workload} has none")
    return ExactFamily({layer: manifest.lora_scaling(layer) for layer in layers})


def _talora(config: AggregatorConfig, manifest: Manifest) -> Family:
    if not config.task_schedule:
        raise ValueError("fed-talora needs a task schedule (--task-schedule, the classes of "
                         "each task)")
    return _exact(config, manifest)


def _fltac(config: AggregatorConfig, manifest: Manifest) -> Family:
    if config.num_clusters > config.clients_per_round:
        raise ValueError(f"fltac: --clusters {config.num_clusters} exceeds the "
                         f"{config.clients_per_round} task slots a round collects")
    return FLTACFamily(config.num_clusters, config.seed)


# name -> builder. FLORA's aggregation is exactly FedAvg, and CoLoRA's server side is FedAvg of
# the shared tensors (the coordinator never sees a personal one); the names say which paper.
FAMILIES: dict[str, Callable[[AggregatorConfig, Manifest], Family]] = {
    "fedavg": _streaming,
    "flora": _streaming,
    "colora": _streaming,
    "fedmedian": _median,
    "trimmed_mean": _trimmed,
    "dp-fedavg": _dp,
    "exact": _exact,
    "fed-talora": _talora,
    "fltac": _fltac,
}
STRATEGY_NAMES = tuple(sorted(FAMILIES))
# Strategies whose rounds can stream (aggregate from a running sum): the only ones async
# (FedBuff) mode can replace; the others need every update of one round.
ASYNC_STRATEGIES = ("fedavg", "flora", "colora")
# Strategies that want the device's workload to carry something beyond a plain adapter.
RESIDUAL_STRATEGIES = ("exact", "fed-talora")


# Strategies whose round is one weighted sum, so partial sums from several worker processes or
# gateways merge into exactly the round a single aggregator would have closed.
MERGEABLE_STRATEGIES = ("fedavg", "flora", "colora")


def check_mergeable(config: AggregatorConfig, how: str) -> None:
    """Refuse a configuration whose rounds cannot be merged from partial sums (`how` names
    the option that merges them, for the message).

    Raises:
        ValueError: a strategy outside MERGEABLE_STRATEGIES, or async mode.
    """
    if config.strategy not in MERGEABLE_STRATEGIES:
        raise ValueError(f"{how} merges partial weighted sums, but {config.strategy} needs "
                         f"every update of a round in one place: use "
                         f"{', '.join(MERGEABLE_STRATEGIES)}, or run one aggregator")
    if config.mode != "sync":
        raise ValueError(f"{how} merges synchronous rounds: use --mode sync")


def make_family(config: AggregatorConfig, manifest: Manifest) -> Family:
    """The family that runs `config.strategy`, after refusing settings it cannot honour.

    Raises:
        ValueError: an unknown strategy or a combination that would silently break.
    """
    if config.strategy not in FAMILIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose from "
                         f"{', '.join(STRATEGY_NAMES)}")
    if config.mode == "async":
        if config.strategy not in ASYNC_STRATEGIES:
            raise ValueError(f"async (FedBuff) mode sums deltas as they arrive; "
                             f"{config.strategy} needs a whole synchronous round "
                             f"(use --mode sync, or a strategy among {', '.join(ASYNC_STRATEGIES)})")
        return FedBuffFamily(config.max_staleness, config.server_lr)
    if config.task_schedule and config.strategy in ("fltac", "dp-fedavg"):
        raise ValueError(f"a task schedule (class-incremental rounds) is not supported with "
                         f"{config.strategy}")
    return FAMILIES[config.strategy](config, manifest)
