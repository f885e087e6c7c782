"""docs/RESULTS.md: the measured tables with the command, the machine and what is reconstructed."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict

import numpy as np
import torch

from experiments.federation import SimConfig
from experiments.multitask import MULTITASK_METHODS
from experiments.report import Column, RunResult, paired_delta, summary, table
from experiments.runner import ALPHAS, Results, dirichlet_setting
from experiments.settings import CENTRAL, CENTRAL_JOINT, DIRICHLET_METHODS, INCREMENTAL_METHODS

DIRICHLET_COLUMNS = (
    Column("test acc", "test_accuracy"),
    Column("Δ test acc vs FedAvg", "test_accuracy", "delta"),
    Column("best test acc", "best"),
    Column("mean device acc", "mean_device"),
    Column("worst device acc", "worst_device"),
    Column("rounds to best", "rounds_to_best", "int"),
    Column("bytes up / round", "bytes_up", "bytes"),
    Column("bytes down / round", "bytes_down", "bytes"),
    Column("‖R‖ / ‖B̄Ā‖", "residual_ratio"),
    Column("gate flips", "gate_disagreement"),
)
INCREMENTAL_COLUMNS = (
    Column("final acc (10 classes)", "test_accuracy"),
    Column("Δ vs FedAvg", "test_accuracy", "delta"),
    Column("avg incremental acc", "average_incremental"),
    Column("forgetting ↓", "forgetting"),
    Column("rounds to best", "rounds_to_best_incremental", "int"),
    Column("mean device acc", "mean_device"),
    Column("worst device acc", "worst_device"),
    Column("bytes up / round", "bytes_up", "bytes"),
    Column("bytes down / round", "bytes_down", "bytes"),
    Column("‖R‖ / ‖B̄Ā‖", "residual_ratio"),
)
MULTITASK_COLUMNS = (
    Column("mean device acc", "mean_device"),
    Column("Δ vs FedAvg", "mean_device", "delta"),
    Column("worst device acc", "worst_device"),
    Column("type-task acc", "acc_type"),
    Column("group-task acc", "acc_group"),
    Column("rounds to best", "rounds_to_best", "int"),
    Column("bytes up / round", "bytes_up", "bytes"),
    Column("bytes down / round", "bytes_down", "bytes"),
    Column("cluster agreement", "cluster_agreement"),
)

NOTES = """\
## How the simulation works

- FL-TAC and Fed-TaLoRA also run as real federations over MQTT (Mosquitto, the gateway's
  Coordinator, ExecuTorch / ONNX Runtime / torch devices): `python -m experiments.mqtt` writes
  [RESULTS_MQTT.md](RESULTS_MQTT.md).
- One process, no MQTT. Servers call the same functions as the gateway package:
  `aggregator.strategies.fedavg`, `aggregator.exact.exact_aggregate` / `fold` / `rank_caps`,
  `aggregator.clustering.fltac` and `aggregator.personal.colora`.
- Devices train like `edge_client/backends/torch_backend.py`: plain SGD (no momentum), lr 0.05,
  batch 32, batches drawn without replacement as `edge_client.trainer.train_local` draws them.
  The frozen convolutions are computed once per image (every method adapts only fc1/fc2 and the
  head, and the convolutions have no dropout or batch statistics, so this is the same function;
  `tests/test_experiments.py` checks it against the full model).
- FedAvg weights are the devices' local dataset sizes (FLORA's n_k/Σn), as at the gateway, where
  an update's num_samples is its device's dataset size (docs/PROTOCOL.md §5), capped there.
- Test accuracy is on a fixed random slice of the Fashion-MNIST test set. A device's accuracy is
  the per-class test accuracy weighted by that device's own class shares (its label skew); the
  worst device is the minimum over devices. Rounds to best: the first round at which test
  accuracy (multi-task: mean device accuracy) peaks. Numbers are mean ± sample standard deviation
  over the seeds, which change the splits, the initial adapter and the batch order.
- Bytes are float32 tensor payloads summed over all devices per round, without the codec's
  header and zstd compression. Exact aggregation adds what each device receives of the
  residual, as at the gateway: the round's step when it is level with the previous round, the
  catch-up copy of the cumulative residual otherwise.
- Diagnostics: ‖R‖ / ‖B̄Ā‖ is the Frobenius size of the exactness residual next to the averaged
  LoRA update (mean over rounds): the share of the global update that FedAvg gets wrong. Gate
  flips: the fraction of fc1/fc2 units, on the test set after training, where FedSQ's fixed gate
  differs from the sign of the trained copy's own pre-activation; at 0 FedSQ equals plain LoRA.
- One torch thread: the matrices are small, and on 2 shared cores a second thread mostly waits.

## What is a reconstruction

- **FLORA** (arXiv 2404.15182): only its aggregation is used, sample-weighted FedAvg of A and B
  separately; the CLIP model, contrastive loss and Adam of the paper are not.
- **Exact aggregation** (FedEx-LoRA, arXiv 2410.09432): the residual Σp_k B_k A_k − B̄Ā is folded
  into every device's frozen weights each round. As at the gateway, the server keeps the
  cumulative residual exactly (factored up to each layer's crossover rank d_out·d_in/(d_out+d_in),
  dense past it), each global carries only the round's step in factored form (not the paper
  code's dense matrix), and a device that missed rounds takes a catch-up copy of the cumulative.
- **FedSQ** (arXiv 2604.02990): the paper averages full weights of AlexNet/ResNet-18; here the
  quantitative copy is LoRA on fc1/fc2 with gates from the frozen pretrained fc1/fc2, a design
  extension. The per-layer gating form is [UNVERIFIED]; the convolutions are frozen, so only the
  two fully connected ReLUs are gated differently from plain LoRA.
- **Fed-TaLoRA** (arXiv 2505.12318, no public code): "residual calibration" is read as the
  FedEx-LoRA residual; logit masking of classes outside the current task and the single 10-way
  head are the usual class-incremental tricks, not verified for this paper [UNVERIFIED].
- **FL-TAC** (arXiv 2404.15384, code siqi2000/FL-TAC): k-means (n_init 10) on raw flattened
  adapters with K = number of tasks, as the reference code. The two "tasks" here are two
  labellings of Fashion-MNIST, not the paper's GLUE/CIFAR/Dolly tasks.
- **CoLoRA** (arXiv 2602.07218, no public code): W_i = W0 + s·B·S_i·A with shared A, B and a
  personal r×r core S_i initialised to I, trained jointly with A and B by local SGD (the paper's
  alternating minimisation is not reproduced) [UNVERIFIED]. "+ personal head" also keeps the
  classifier head on the device: a deviation, needed here because the tasks label differently.
  A core's gradient is s·Bᵀ(∂L/∂y)(Ax)ᵀ, proportional to B, which starts at 0 and stays small
  under these few SGD steps, so the cores can only move once the shared B has grown.
- All settings are tiny (a handful of devices and rounds on a 1568→128→64 MLP over frozen
  features) so that the whole table runs in minutes on 2 cores; they rank methods on this task
  only and reproduce none of the papers' numbers.
"""


def _delta(runs: list[RunResult], method: str, baseline: str, name: str) -> str:
    values = [v for v in paired_delta(runs, method, baseline, name) if v is not None]
    spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):+.3f}{spread}"


def headlines(results: Results) -> str:
    """One generated sentence per setting: paired differences against the FedAvg row."""
    fedavg, exact, fedsq = (m for m, _, _ in DIRICHLET_METHODS)
    lines = ["## Headlines (generated from the runs above; differences are paired per seed)", ""]
    for alpha in ALPHAS:
        runs = results.runs[dirichlet_setting(alpha)]
        s = summary(runs)
        lines.append(
            f"- Dirichlet α = {alpha}: exact aggregation changes test accuracy by "
            f"{_delta(runs, exact, fedavg, 'test_accuracy')}; its residual is "
            f"{s[exact]['residual_ratio']:.1%} of the averaged LoRA update, and it downloads "
            f"{s[exact]['bytes_down'] / s[fedavg]['bytes_down']:.1f}× FedAvg's bytes. FedSQ "
            f"changes it by {_delta(runs, fedsq, fedavg, 'test_accuracy')} with "
            f"{s[fedsq]['gate_disagreement']:.1%} of its gates differing from the trained copy's "
            f"own ReLUs. Centralized LoRA is {_delta(runs, CENTRAL, fedavg, 'test_accuracy')} "
            "from FedAvg.")
    runs = results.runs["incremental"]
    s = summary(runs)
    plain, mask, talora = (m for m, _, _ in INCREMENTAL_METHODS)
    lines.append(
        f"- Class-incremental: masking the other tasks' logits changes final accuracy by "
        f"{_delta(runs, mask, plain, 'test_accuracy')} and forgetting from "
        f"{s[plain]['forgetting']:.3f} to {s[mask]['forgetting']:.3f}; Fed-TaLoRA's residual "
        f"calibration on top of the mask changes final accuracy by "
        f"{_delta(runs, talora, mask, 'test_accuracy')} and forgetting by "
        f"{_delta(runs, talora, mask, 'forgetting')}. Joint centralized training on all tasks "
        f"(no sequence) is {_delta(runs, CENTRAL_JOINT, plain, 'test_accuracy')} from FedAvg.")
    runs = results.runs["multitask"]
    s = summary(runs)
    shared, tac, cores, head, central = MULTITASK_METHODS
    lines.append(
        f"- Multi-task: FL-TAC changes mean device accuracy by "
        f"{_delta(runs, tac, shared, 'mean_device')} and worst-device accuracy by "
        f"{_delta(runs, tac, shared, 'worst_device')}, its last clustering matching "
        f"{s[tac]['cluster_agreement']:.0%} of devices to their task. CoLoRA's personal cores "
        f"alone change mean device accuracy by {_delta(runs, cores, shared, 'mean_device')}; "
        f"with a personal head too, by {_delta(runs, head, shared, 'mean_device')}. One "
        f"centralized LoRA per task is {_delta(runs, central, shared, 'mean_device')} from "
        "FedAvg.")
    return "\n".join(lines)


def render(results: Results, config: SimConfig, command: str) -> str:
    """The whole Markdown document."""
    total = sum(results.seconds.values())
    cores = os.cpu_count()
    settings = ", ".join(f"{k}={v}" for k, v in asdict(config).items())
    parts = [
        "# Results: the five federated LoRA methods",
        "",
        f"Produced by `{command}` (rerun it to refresh this file; do not edit by hand): "
        "Fashion-MNIST in simulation. The last section, MiniLM on real text as MQTT federations, "
        "is written by `python -m experiments.text`; each command keeps the other's part.",
        "",
        f"- Machine: {cores} CPU cores ({platform.machine()}, {platform.system()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{results.torch_threads} torch thread(s).",
        f"- Wall time: {total:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items()) + ").",
        f"- Configuration: {settings}.",
        "",
    ]
    for alpha in ALPHAS:
        parts += [f"## Fashion-MNIST, Dirichlet α = {alpha}", "",
                  f"{config.devices} devices, all taking part in each of {config.rounds} rounds of "
                  f"{config.local_steps} local steps.", "",
                  table(results.runs[dirichlet_setting(alpha)], DIRICHLET_COLUMNS), ""]
    parts += ["## Class-incremental, 5 tasks × 2 classes", "",
              f"Tasks {{0,1}}, {{2,3}}, … arrive in order; {config.rounds_per_task} rounds per "
              "task, "
              "each task's data split over the devices by Dirichlet α = 0.5. Accuracy is measured "
              "without a task id over all classes seen so far; forgetting is the mean drop of "
              "tasks 1–4 from their best to their final accuracy; rounds to best counts the "
              "rounds up to the task end where that accuracy peaked (an early peak: later "
              "tasks cost more than they add).", "",
              table(results.runs["incremental"], INCREMENTAL_COLUMNS), "",
              "## Multi-task: clothing type (10 classes) vs garment group (4 classes)", "",
              "Half the devices label images by type, half (on other images) by group: tops, "
              "trousers/dresses, footwear, bags. Only two classes keep the same index in both "
              "labellings. Cluster agreement: the fraction of devices FL-TAC's last clustering "
              "put with their own task (best matching).", "",
              table(results.runs["multitask"], MULTITASK_COLUMNS), "", headlines(results), "",
              NOTES]
    return "\n".join(parts)
