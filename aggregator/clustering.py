"""FL-TAC: k-means over submitted adapters, then a sample-weighted FedAvg inside each cluster.

Ping, Mao, Liu, Zhang, Ding, "FL-TAC: Enhanced Fine-Tuning in Federated Learning via Low-Rank,
Task-Specific Adapter Clustering", arXiv 2404.15384 (ICLR 2024 workshop); reference code
siqi2000/FL-TAC (ALGORITHMS.md §5). Every (client, task) slot submits one adapter without saying
which task it serves; the server clusters the flattened adapters (sorted keys) with Euclidean
k-means, K = the number of tasks, and sends each slot the weighted average of its own cluster.
Clustering on per-round deltas (adapter − what the slot was sent) is an option the notes suggest
as a deviation: identical initial adapters otherwise dominate the early distances.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from aggregator.strategies import WeightedAdapter, fedavg
from protocol.tensors import TensorDict

# The reference code's k-means restarts: ten seeds, keep the lowest inertia.
KMEANS_RESTARTS = 10


@dataclass(frozen=True, slots=True)
class Clustering:
    """Cluster id and new adapter of every submission slot, in submission order."""

    labels: np.ndarray  # (n,) int, values in [0, number of clusters)
    adapters: list[TensorDict]


def flatten(adapter: TensorDict) -> np.ndarray:
    """All tensors of `adapter`, in sorted-key order, as one float64 vector."""
    return np.concatenate([np.ravel(adapter[k]).astype(np.float64) for k in sorted(adapter)])


def fltac(
    updates: Sequence[WeightedAdapter],
    num_clusters: int,
    seed: int,
    reference: Sequence[TensorDict] | None = None,
) -> Clustering:
    """Cluster the submissions into `num_clusters` groups and average within each group.

    Args:
        updates: (adapter, sample count) per submission slot, all with the same tensor names.
        num_clusters: K, the number of tasks in the system.
        seed: k-means random_state, so a round's clustering is reproducible.
        reference: if given, one adapter per slot (what it started the round from); k-means then
            runs on the deltas adapter − reference, while the averages are still of the adapters.

    Returns:
        Clustering with each slot's cluster id and its cluster's weighted average. With at most
        K submissions every slot is its own cluster and keeps its adapter.

    Raises:
        ValueError: no updates, K < 1, a reference list of the wrong length, or fedavg's errors.
    """
    if not updates:
        raise ValueError("fltac needs at least one update")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
    if reference is not None and len(reference) != len(updates):
        raise ValueError(f"{len(reference)} reference adapters for {len(updates)} updates")
    if len(updates) <= num_clusters:
        # k-means cannot place K centres on fewer points; each slot is its own task group.
        return Clustering(np.arange(len(updates)),
                          [fedavg([update]) for update in updates])
    points = np.stack([flatten(adapter) for adapter, _ in updates])
    if reference is not None:
        points = points - np.stack([flatten(r) for r in reference])
    # Imported here: scikit-learn and SciPy add tens of MB, and only FL-TAC gateways need them.
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=num_clusters, n_init=KMEANS_RESTARTS,
                    random_state=seed).fit_predict(points)
    averages = {int(c): fedavg([u for u, label in zip(updates, labels, strict=True) if label == c])
                for c in np.unique(labels)}
    return Clustering(labels.astype(np.int64), [averages[int(c)] for c in labels])


def cluster_agreement(labels: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of slots whose cluster matches their true task under the best one-to-one mapping.

    For analysis only (the reference code logs it with Hungarian matching); brute force over
    permutations is fine for the handful of tasks simulated here.
    """
    labels, truth = np.asarray(labels), np.asarray(truth)
    clusters = {c: i for i, c in enumerate(np.unique(labels))}
    tasks = {t: i for i, t in enumerate(np.unique(truth))}
    if max(len(clusters), len(tasks)) > 8:
        raise ValueError("cluster_agreement brute-forces permutations; use at most 8 groups")
    # counts[c, t]: slots in cluster c whose true task is t
    counts = np.zeros((len(clusters), max(len(clusters), len(tasks))), dtype=np.int64)
    for c, t in zip(labels, truth, strict=True):
        counts[clusters[c], tasks[t]] += 1
    best = max(sum(counts[i, j] for i, j in enumerate(perm))
               for perm in permutations(range(counts.shape[1]), len(clusters)))
    return float(best) / len(labels)


def carry_assignment(previous: dict[str, int], current: dict[str, int]) -> dict[str, int]:
    """Slot -> cluster after a round: this round's labels, plus where absent slots belong now.

    k-means numbers its clusters afresh every round, so a slot that did not report keeps its
    group, not its old number: it goes to the new cluster that most of its old cluster's
    reporting members joined. A slot whose old cluster had no reporting member is left out
    (it then starts from the global mean adapter).
    """
    moved: dict[int, Counter[int]] = {}
    for slot, old in previous.items():
        if slot in current:
            moved.setdefault(old, Counter())[current[slot]] += 1
    result = dict(current)
    for slot, old in previous.items():
        if slot not in current and old in moved:
            # most_common breaks ties by first insertion: deterministic for a given order
            result[slot] = moved[old].most_common(1)[0][0]
    return result
