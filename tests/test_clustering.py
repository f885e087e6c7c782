"""FL-TAC clustering: recovers well-separated task groups and averages within each group."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.clustering import carry_assignment, cluster_agreement, flatten, fltac
from aggregator.strategies import fedavg

SHAPES = {"fc1.lora_A.weight": (2, 6), "fc1.lora_B.weight": (5, 2), "head.bias": (3,)}


def centre(task: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + task)
    return {k: 10.0 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def around(task: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
            for k, v in centre(task).items()}


def synthetic(num_tasks: int, per_task: int) -> tuple[list, np.ndarray]:
    truth = np.array([t for t in range(num_tasks) for _ in range(per_task)])
    rng = np.random.default_rng(5)
    order = rng.permutation(len(truth))  # interleave tasks so slot order reveals nothing
    truth = truth[order]
    updates = [(around(int(t), seed), float(rng.integers(10, 100))) for seed, t in enumerate(truth)]
    return updates, truth


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_fltac_recovers_clusters_and_gives_each_slot_its_cluster_mean(num_tasks: int) -> None:
    # Prepare
    updates, truth = synthetic(num_tasks, per_task=4)
    # Execute
    result = fltac(updates, num_tasks, seed=0)
    # Assert: a perfect partition, and every slot holds the weighted mean of its true task's slots
    assert cluster_agreement(result.labels, truth) == 1.0
    assert len(result.adapters) == len(updates)
    for slot, task in enumerate(truth):
        members = [u for u, t in zip(updates, truth, strict=True) if t == task]
        expected = fedavg(members)
        for key in SHAPES:
            np.testing.assert_allclose(result.adapters[slot][key], expected[key], rtol=1e-6)
            assert result.adapters[slot][key].dtype == np.float32


def test_fltac_clusters_on_deltas_when_given_references() -> None:
    # Every slot starts from a different random point; only the per-round step reveals the task.
    updates, truth = synthetic(2, per_task=4)
    rng = np.random.default_rng(9)
    starts = [{k: 1000.0 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
              for _ in updates]
    shifted = [({k: v + starts[i][k] for k, v in u.items()}, w) for i, (u, w) in enumerate(updates)]
    on_deltas = fltac(shifted, 2, seed=0, reference=starts)
    assert cluster_agreement(on_deltas.labels, truth) == 1.0


def test_fltac_with_at_most_k_submissions_keeps_each_adapter() -> None:
    updates = [(around(t, t), 5.0) for t in range(3)]
    for k in (3, 4):
        result = fltac(updates, k, seed=0)
        np.testing.assert_array_equal(result.labels, np.arange(3))
        for (adapter, _), got in zip(updates, result.adapters, strict=True):
            for key in SHAPES:
                np.testing.assert_array_equal(got[key], adapter[key])


def test_fltac_is_reproducible_for_a_seed() -> None:
    updates, _ = synthetic(3, per_task=3)
    a, b = fltac(updates, 3, seed=4), fltac(updates, 3, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_flatten_uses_sorted_keys() -> None:
    adapter = {"b": np.array([3.0, 4.0], np.float32), "a": np.array([[1.0], [2.0]], np.float32)}
    np.testing.assert_array_equal(flatten(adapter), [1.0, 2.0, 3.0, 4.0])


def test_bad_arguments_raise() -> None:
    updates, _ = synthetic(2, per_task=2)
    with pytest.raises(ValueError, match="at least one"):
        fltac([], 2, seed=0)
    with pytest.raises(ValueError, match="num_clusters"):
        fltac(updates, 0, seed=0)
    with pytest.raises(ValueError, match="reference"):
        fltac(updates, 2, seed=0, reference=[updates[0][0]])


def test_fltac_hand_example_two_obvious_groups() -> None:
    # Four slots, one tensor; slots 0, 1 sit near the origin, slots 2, 3 near (10, 10).
    # Within-cluster FedAvg weighted by samples (FL-TAC's per-cluster aggregation):
    #   {0, 1}: (1·[0, 0] + 3·[1, 2]) / (1 + 3)  = [3, 6] / 4   = [0.75, 1.5]
    #   {2, 3}: (2·[10, 10] + 2·[12, 16]) / (2 + 2) = [44, 52] / 4 = [11, 13]
    updates = [({"x": np.array(v, np.float32)}, w)
               for v, w in (([0.0, 0.0], 1.0), ([1.0, 2.0], 3.0),
                            ([10.0, 10.0], 2.0), ([12.0, 16.0], 2.0))]
    result = fltac(updates, num_clusters=2, seed=0)
    labels = result.labels.tolist()
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    assert sorted(set(labels)) == [0, 1]
    for slot, expected in ((0, [0.75, 1.5]), (1, [0.75, 1.5]), (2, [11.0, 13.0]),
                           (3, [11.0, 13.0])):
        np.testing.assert_array_equal(result.adapters[slot]["x"], expected)


@pytest.mark.parametrize(("labels", "truth", "agreement"), [
    # the same partition under other cluster numbers: 4 of 4
    ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),
    # crossing partitions: either mapping matches slots {0, 3} or {1, 2}, 2 of 4
    ([0, 1, 0, 1], [0, 0, 1, 1], 0.5),
    # one slot misplaced: mapping 0→0, 1→1 matches 3 of 4
    ([0, 0, 0, 1], [0, 0, 1, 1], 0.75),
    # three groups, renumbered: 5 of 5
    ([2, 2, 0, 0, 1], [0, 0, 1, 1, 2], 1.0),
    # cluster 1 holds tasks 0 and 1: best is 0→0, 1→1, 2→2 = 1 + 2 + 1 = 4 of 5
    ([0, 1, 1, 1, 2], [0, 0, 1, 1, 2], 0.8),
    # more clusters than tasks: 0→0 (1 slot), 2→1 (2 slots), cluster 1 unmatched: 3 of 4
    ([0, 1, 2, 2], [0, 0, 1, 1], 0.75),
    # everything in one cluster over two equal tasks: it can match one task, 2 of 4
    ([0, 0, 0, 0], [0, 0, 1, 1], 0.5),
])
def test_cluster_agreement_hand_examples(labels: list[int], truth: list[int],
                                         agreement: float) -> None:
    assert cluster_agreement(np.array(labels), np.array(truth)) == agreement


def test_carry_assignment_follows_the_group_not_the_cluster_number() -> None:
    # Round r: a, b, c in cluster 0 and d, e in cluster 1. Round r+1: k-means numbers them the
    # other way round, and c and e did not report.
    previous = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "lost": 2}
    current = {"a": 1, "b": 1, "d": 0}
    carried = carry_assignment(previous, current)
    assert carried == {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0}  # "lost": no member reported
    assert carry_assignment({}, current) == current
