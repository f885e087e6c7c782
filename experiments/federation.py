"""In-process federation of one global adapter: FedAvg/FLORA or exact (residual) aggregation.

With exact aggregation the server runs the gateway's residual ledger (aggregator.exact): each
round's scaled residual is added exactly to the cumulative R_t (`accumulate_exact`); a selected
device level with the previous round receives only that round's step (the global's
`residual_step`), one that missed rounds receives the catch-up copy of R_t (`catch_up_copy`, the
residual topic's message), exactly as the gateway's devices do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from aggregator.exact import (
    Residual,
    accumulate_exact,
    catch_up_copy,
    dense,
    exact_aggregate,
    residual_nbytes,
    scaled,
)
from aggregator.strategies import fedavg
from experiments.data import Features
from protocol.residual import dense_residual
from experiments.models import (
    adapter_nbytes,
    base_weights_of,
    lora_base_layers,
    set_base_weights,
    sgd_optimiser,
    train_steps,
)
from workloads.lora import get_adapter, set_adapter

AGGREGATIONS = ("fedavg", "exact")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Sizes of a simulated federation (kept small: the whole table must run on 2 cores)."""

    devices: int = 10
    rounds: int = 20
    local_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05  # edge_client.trainer.DEFAULT_LEARNING_RATE
    train_examples: int = 20_000
    test_examples: int = 10_000
    rounds_per_task: int = 6
    participation: float = 1.0  # fraction of devices selected each round
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class Device:
    """One simulated device: its index, local data and the labels it trains on."""

    index: int
    data: Features
    labels: np.ndarray


class GlobalFederation:
    """Server + devices sharing one global adapter; with `exact`, a cumulative residual in W0.

    The server's cumulative residual R_t is scaled (weight units) and exact. A device keeps the
    residual round it holds: level with the previous round it adds the last step, otherwise it
    takes the catch-up copy of R_t; bytes down count what it received.
    """

    def __init__(self, model: nn.Module, config: SimConfig, aggregation: str) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose from {AGGREGATIONS}")
        self.model, self.config, self.exact = model, config, aggregation == "exact"
        self.optimiser = sgd_optimiser(model, config.learning_rate)
        self.adapter = get_adapter(model)
        self.scaling = {name: s for name, (_, s) in lora_base_layers(model).items()}
        self.pretrained_w0 = base_weights_of(model)
        self.cumulative: dict[str, np.ndarray] = {}  # R_t in wire form (scaled, exact)
        self.step: Residual = {}  # R_t − R_(t−1)
        self.server_w0 = self.pretrained_w0
        self.device_w0: dict[int, dict[str, np.ndarray]] = {}  # the W0 each device last set
        self.device_round: dict[int, int] = {}  # the residual round each device holds
        self.version = 0
        self.bytes_up: list[int] = []
        self.bytes_down: list[int] = []
        self.residual_ratio: list[float] = []  # ‖R‖_F / ‖B̄Ā‖_F per round, over all LoRA layers
        self.truncation_error: list[float] = []  # of the catch-up copy per round (0: exact)

    def round(
        self, devices: Sequence[Device], rng: np.random.Generator,
        allowed: np.ndarray | None = None,
    ) -> None:
        """One round: selected devices train from the global, the server aggregates."""
        count = max(1, round(self.config.participation * len(devices)))
        chosen = [devices[i] for i in np.sort(rng.choice(len(devices), count, replace=False))]
        updates, up, down = [], 0, 0
        for device in chosen:
            if self.exact:
                down += self._catch_up(device.index)
                set_base_weights(self.model, self.device_w0[device.index])
            set_adapter(self.model, self.adapter)
            down += adapter_nbytes(self.adapter)
            train_steps(self.model, self.optimiser, device.data, device.labels,
                        self.config.local_steps, self.config.batch_size, rng, allowed)
            update = get_adapter(self.model)
            up += adapter_nbytes(update)
            # FLORA's weights: the device's number of training examples
            updates.append((update, float(len(device.labels))))
        self.version += 1
        if self.exact:
            self.adapter, res = exact_aggregate(updates)
            self.residual_ratio.append(_residual_ratio(self.adapter, res))
            self.step = scaled(res, self.scaling)
            self.cumulative = accumulate_exact(self.cumulative, self.step)
            self.truncation_error.append(catch_up_copy(self.cumulative)[1])
            self.server_w0 = self._with_residual(dense_residual(self.cumulative))
        else:
            self.adapter = fedavg(updates)
        self.bytes_up.append(up)
        self.bytes_down.append(down)

    def use_global(self) -> nn.Module:
        """The model loaded with the server's global state (for evaluation)."""
        if self.exact:
            set_base_weights(self.model, self.server_w0)
        set_adapter(self.model, self.adapter)
        return self.model

    def _catch_up(self, index: int) -> int:
        """Bring a device's W0 level with the server; return the residual bytes it received."""
        held = self.device_round.setdefault(index, 0)  # a new device holds R_0 = 0
        self.device_w0.setdefault(index, self._with_residual({}))
        if held == self.version:
            received = 0
        elif held == self.version - 1:  # the global's step
            self.device_w0[index] = {name: w + dense(self.step[name]) if name in self.step
                                     else w for name, w in self.device_w0[index].items()}
            received = residual_nbytes(self.step)
        else:  # the residual topic's catch-up copy of R_t
            tensors, _ = catch_up_copy(self.cumulative)
            self.device_w0[index] = self._with_residual(dense_residual(tensors))
            received = sum(v.nbytes for v in tensors.values())
        self.device_round[index] = self.version
        return received

    def _with_residual(self, res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pretrained W0 + the residual per LoRA layer (the residual is already scaled)."""
        return {name: w + res[name] if name in res else w.copy()
                for name, w in self.pretrained_w0.items()}


def _residual_ratio(adapter: dict[str, np.ndarray], res: Residual) -> float:
    """How large the exactness correction is next to the averaged LoRA update itself."""
    num = sum(float(np.sum(dense(f) ** 2)) for f in res.values())
    den = sum(float(np.sum((adapter[f"{n}.lora_B.weight"].astype(np.float64)
                            @ adapter[f"{n}.lora_A.weight"]) ** 2)) for n in res)
    return float(np.sqrt(num / den)) if den > 0 else 0.0
