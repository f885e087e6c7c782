"""Client-level differential privacy for FedAvg with the fixed-denominator estimator.

DP-FedAvg as in McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018, arXiv 1710.06963), Algorithm 1 with every device weighted w_k = 1:
each device's change Δ_k = adapter_k − start is clipped to L2 norm ≤ C over all tensors together,
and the round's global is

    start + f̃_f,   f̃_f = (Σ_{k reported} Δ_k + N(0, (σ·C)² I)) / W,

the paper's fixed-denominator estimator f̃_f = Σ w_k Δ_k / (qW) with qW = W, the number of
contributors *expected* this round (the configured cohort size), fixed before any device reports.
Because W does not depend on who reported, adding or removing one device (the paper's user-level
adjacency, Definition 1) changes the pre-noise result by at most C/W whatever the others do
(the paper's Lemma 1: sensitivity S/(qW)), and the noise on the result has standard deviation
σ·C/W, i.e. exactly σ times that sensitivity: σ is the noise multiplier that
`aggregator.accounting.epsilon` turns into an (ε, δ) guarantee. (Dividing by the number n that
happened to report instead would let one device move the mean by ~2C/n while the noise is σC/n.)
Replacing one device's update by another changes the pre-noise result by at most 2C/W.

Sample counts are ignored on purpose: weighting by self-reported counts would let one device's
influence exceed C/W.

The noise comes from the operating system's CSPRNG (`os.urandom`), never from a seed: noise that
an observer can regenerate can be subtracted, and then it protects nothing.

A round is a running state: the caller keeps `clipped_sum`, the float64 sum of `clip_delta(...)`
over the devices that reported, and calls `dp_step` once when the round closes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import numpy as np

from aggregator.robust import delta_norm
from protocol.tensors import TensorDict

NoiseSource = Callable[[tuple[int, ...], float], np.ndarray]

_TWO_POW_MINUS_53 = 2.0 ** -53


def gaussian_noise(shape: tuple[int, ...], std: float,
                   random_bytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """I.i.d. N(0, std²) noise of the given shape, from the operating system's CSPRNG.

    Each pair of draws takes 16 bytes: two little-endian 64-bit words whose top 53 bits give
    uniforms u, v in [0, 1) (multiples of 2⁻⁵³). The Box–Muller transform then gives
    r·cos(2πv) and r·sin(2πv) with r = √(−2 ln(1 − u)); using 1 − u ∈ (0, 1] keeps the logarithm
    finite when u = 0. The draws are therefore truncated at √(106 ln 2) ≈ 8.57 standard
    deviations, a probability of about 10⁻¹⁶ per draw.

    Args:
        shape: the shape of the array to return.
        std: the standard deviation, ≥ 0 (0 gives zeros and reads no bytes).
        random_bytes: where the bytes come from; `os.urandom` always. A parameter only so that a
            test can show that these bytes, and nothing else, determine the result.

    Returns:
        float64 array of `shape`.

    Raises:
        ValueError: std is negative or not finite, shape has a negative size, or random_bytes
            returned the wrong number of bytes.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    count = math.prod(shape)
    if std == 0 or count == 0:
        return np.zeros(shape, np.float64)
    pairs = (count + 1) // 2
    raw = random_bytes(16 * pairs)
    if len(raw) != 16 * pairs:
        raise ValueError(f"random_bytes returned {len(raw)} bytes, expected {16 * pairs}")
    words = np.frombuffer(raw, dtype="<u8").reshape(pairs, 2)
    uniforms = (words >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log1p(-uniforms[:, 0]))  # log(1 - u), 1 - u in (0, 1]
    angle = 2.0 * np.pi * uniforms[:, 1]
    normals = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)
    return (normals[:count] * std).reshape(shape)


def _check_names_and_shapes(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                            what: str) -> None:
    if set(tensors) != set(reference):
        raise ValueError(f"{what}: tensor names differ: {sorted(set(tensors) ^ set(reference))}")
    for key, array in tensors.items():
        if np.shape(array) != np.shape(reference[key]):
            raise ValueError(f"{what}: tensor {key!r} has shape {np.shape(array)}, "
                             f"expected {np.shape(reference[key])}")


def clip_delta(adapter: TensorDict, start: TensorDict, clip_norm: float) -> TensorDict:
    """A device's change adapter − start, scaled to L2 norm ≤ C over all tensors together.

    The per-user clipping of McMahan et al. (2018), Algorithm 1 (ClipFn with the flat clip): the
    delta is multiplied by min(1, C / ‖Δ‖), so its direction is kept. Sum the results over the
    devices that report and pass the sum to `dp_step`.

    Args:
        adapter: the adapter the device sent.
        start: the global adapter the device started the round from.
        clip_norm: C > 0.

    Returns:
        The clipped delta, float64, with start's tensor names and shapes.

    Raises:
        ValueError: C is not a positive finite number, the names or shapes differ from start's,
            or the adapter holds NaN or Inf.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    _check_names_and_shapes(adapter, start, "clip_delta")
    for key, array in adapter.items():
        if not np.all(np.isfinite(array)):
            raise ValueError(f"clip_delta: tensor {key!r} holds NaN or Inf")
    norm = delta_norm(adapter, start)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {key: (np.asarray(adapter[key], np.float64) - np.asarray(start[key], np.float64)) * scale
            for key in start}


def dp_step(start: TensorDict, clipped_sum: Mapping[str, np.ndarray], expected_contributors: float,
            clip_norm: float, noise_multiplier: float,
            noise: NoiseSource = gaussian_noise) -> TensorDict:
    """The round's new global: start + (Σ clipped deltas + N(0, (σC)²)) / W.

    McMahan et al. (2018), Algorithm 1 with the fixed-denominator estimator f̃_f (qW = W): the
    denominator W is the number of contributors expected this round, fixed in advance, not the
    number that reported. One device then changes the pre-noise result by at most C/W (added or
    removed; 2C/W replaced) however many others report, and the noise on the result has standard
    deviation σ·C/W. If fewer than W report, the update is shrunk accordingly, as in the paper.

    Args:
        start: the global adapter the round started from.
        clipped_sum: per tensor, the sum of `clip_delta(adapter, start, clip_norm)` over the
            devices that reported (zeros if none did).
        expected_contributors: W > 0, the round's configured cohort size.
        clip_norm: C > 0, the clip norm the deltas were clipped to.
        noise_multiplier: σ ≥ 0; 0 gives clipped FedAvg with a fixed denominator and no privacy.
        noise: noise(shape, std) → float64 array; `gaussian_noise` (the OS CSPRNG) always. Called
            once per tensor with std = σ·C, the noise on the sum.

    Returns:
        The new global adapter, float32.

    Raises:
        ValueError: W, C or σ out of range, names or shapes of clipped_sum differ from start's,
            or clipped_sum holds NaN or Inf.
    """
    if not (math.isfinite(expected_contributors) and expected_contributors > 0):
        raise ValueError(f"expected_contributors must be a finite number > 0, "
                         f"got {expected_contributors}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    _check_names_and_shapes(clipped_sum, start, "dp_step")
    std = noise_multiplier * clip_norm
    result = {}
    for key, reference in start.items():
        total = np.asarray(clipped_sum[key], np.float64)
        if not np.all(np.isfinite(total)):
            raise ValueError(f"dp_step: clipped_sum tensor {key!r} holds NaN or Inf")
        noisy = total + noise(tuple(total.shape), std)
        result[key] = (np.asarray(reference, np.float64) + noisy / expected_contributors).astype(
            np.float32)
    return result
