"""Every workload owns its data: device shares and a held-out test set in its model's format."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_client.data import device_partitions, multitask_tasks
from edgefl.cli import _federation_config, build_parser
from workloads import WORKLOAD_NAMES
from workloads.base import capability, private_pool
from workloads.data import Dataset, dirichlet_share, min_share
from workloads.fortune_tokens import FortuneTokens
from workloads.registry import get_workload_data

REPO = Path(__file__).resolve().parent.parent
# The input each model takes: (dtype, shape of one example).
INPUT = {"fmnist-cnn": (np.float32, (1, 28, 28)), "fmnist-fedsq": (np.float32, (1, 28, 28)),
         "fmnist-colora": (np.float32, (1, 28, 28)), "minilm-fortunes": (np.int64, (64,)),
         "minilm-colora": (np.int64, (64,))}


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_device_shares_are_deterministic_disjoint_and_in_model_format(name: str) -> None:
    data = get_workload_data(name)
    dtype, shape = INPUT[name]
    shares = [data.device_data(i, 4, alpha=0.5, seed=3) for i in range(4)]
    for share in shares:
        assert share.x.dtype == dtype and share.x.shape[1:] == shape
        assert share.y.dtype == np.int64 and len(share) >= 2 * data.batch_size
        assert set(np.unique(share.y)) <= set(range(len(data.labels)))
    again = data.device_data(2, 4, alpha=0.5, seed=3)
    np.testing.assert_array_equal(again.x, shares[2].x)
    assert not np.array_equal(data.device_data(2, 4, alpha=0.5, seed=4).y, shares[2].y)
    # The shares partition the private pool (non-IID: label counts differ between devices).
    pool = private_pool(data)
    assert sum(len(s) for s in shares) == len(pool)
    counts = np.array([np.bincount(s.y, minlength=len(data.labels)) for s in shares])
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(pool.y))
    assert (counts.std(axis=0) > 0).all()


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_the_test_set_is_held_out_and_covers_every_class(name: str) -> None:
    data = get_workload_data(name)
    dtype, shape = INPUT[name]
    test = data.test_data(200)
    assert len(test) == 200 and test.x.dtype == dtype and test.x.shape[1:] == shape
    assert set(np.unique(test.y)) == set(range(len(data.labels)))  # a sample, not one class
    assert len(data.test_data()) > data.eval_size >= 200
    np.testing.assert_array_equal(data.test_data(50).y, test.y[:50])  # stable prefix


def test_fortunes_split_keeps_test_quotes_out_of_every_share() -> None:
    data = FortuneTokens()
    train = {row.tobytes() for row in private_pool(data).x}
    test = {row.tobytes() for row in data.test_data().x}
    # A quote that appears in two category files tokenizes the same; the corpus has a few.
    assert len(train & test) <= 0.01 * len(test)


def test_fortune_token_ids_are_read_from_the_cache_without_the_tokenizer() -> None:
    FortuneTokens().device_data(0, 2, alpha=1.0, seed=0)  # builds the cache if needed
    fresh = FortuneTokens()
    share = fresh.device_data(1, 2, alpha=1.0, seed=0)
    assert "tokenizer" not in fresh.__dict__  # the slow tokenizer was never loaded
    pad = 0  # [PAD] of all-MiniLM-L6-v2's vocabulary
    assert (share.x[:, 0] == 101).all() and (share.x == pad).any()  # [CLS] first, padded rows


def test_a_large_fleet_gets_small_but_nonempty_shares() -> None:
    data = get_workload_data("fmnist-cnn")
    assert min_share(50_000, 1000, 32) == 6 and min_share(50_000, 3, 32) == 64
    assert min(len(data.device_data(i, 1000, 0.5, 0)) for i in (0, 500, 999)) >= 6


def test_device_partitions_index_the_same_shares_as_device_data() -> None:
    pool, parts = device_partitions(3, alpha=0.5, seed=1)
    data = get_workload_data("fmnist-cnn")
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(pool.subset(part).y, data.device_data(i, 3, 0.5, 1).y)


def test_a_share_index_outside_the_fleet_is_refused() -> None:
    pool = Dataset(np.zeros((10, 1)), np.zeros(10, dtype=np.int64), "x")
    with pytest.raises(ValueError, match="outside"):
        dirichlet_share(pool, 3, 3, 1.0, 0, batch_size=1)


def test_multitask_and_incremental_are_capabilities_with_a_one_line_refusal() -> None:
    fmnist = get_workload_data("fmnist-cnn")
    share = fmnist.device_data(0, 3, 0.5, 0)
    tasks = multitask_tasks(fmnist, 0, 3, 0.5, 0, slot_seed=0)
    assert set(tasks) == {"type", "group"} and tasks["group"].labels.max() <= 3
    # disjoint halves of the device's own share, the group task relabelled by garment group
    assert len(tasks["type"].labels) + len(tasks["group"].labels) == len(share)
    assert sorted({t.name for t in tasks.values()}) == ["t0", "t1"]
    assert capability(fmnist, "incremental_tasks")[0] == (0, 1)
    # a workload without the capability is refused in one line (a stand-in lacking both)
    bare = SimpleNamespace(name="bare")
    with pytest.raises(ValueError, match="^workload bare has no multi-task split"):
        multitask_tasks(bare, 0, 3, 0.5, 0, slot_seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^workload bare has no class-incremental schedule"):
        capability(bare, "incremental_tasks")  # type: ignore[arg-type]


def test_fortunes_tasks_are_different_quotes_with_their_own_labels() -> None:
    # Prepare
    minilm = get_workload_data("minilm-fortunes")

    # Execute
    tasks = minilm.local_tasks(1, 4, 0.5, 0)
    topic_test, language_test = (minilm.task_test_data(t) for t in ("topic", "language"))

    # Assert: topic = English categories (the plain share), language = 4 other languages;
    # no quote is in both tasks, nor in a task's training share and its test set
    np.testing.assert_array_equal(tasks["topic"].x, minilm.device_data(1, 4, 0.5, 0).x)
    assert set(np.unique(language_test.y)) == {0, 1, 2, 3}
    rows = {task: {r.tobytes() for r in data.x} for task, data in tasks.items()}
    assert not rows["topic"] & rows["language"]
    assert not rows["language"] & {r.tobytes() for r in language_test.x}
    assert not {r.tobytes() for r in topic_test.x} & {r.tobytes() for r in language_test.x}
    assert capability(minilm, "incremental_tasks") == ((0, 1), (2, 3))


def test_demo_and_emulate_defaults_come_from_the_workload() -> None:
    parser = build_parser()
    minilm = get_workload_data("minilm-fortunes")
    config = _federation_config(parser.parse_args(["demo", "--workload", "minilm-fortunes"]),
                                "runs/demo")
    assert (config.fleet.devices, config.rounds, config.local_steps) == (
        minilm.demo.devices, minilm.demo.rounds, minilm.demo.local_steps)
    config = _federation_config(parser.parse_args(["emulate", "--rounds", "7"]), "runs/emulate")
    assert config.fleet.devices == get_workload_data("fmnist-cnn").emulate.devices
    assert config.rounds == 7  # a flag overrides the workload's default


def test_the_data_half_imports_no_torch() -> None:
    # The gateway asks workloads about capabilities (fed-talora's schedule) and has no torch.
    import subprocess

    FortuneTokens().token_cache()  # tokenizing (transformers, torch) happens once, not here
    code = ("import sys; from workloads.registry import get_workload_data as g; "
            "[g(n).device_data for n in ('fmnist-cnn', 'minilm-fortunes')]; "
            "g('minilm-fortunes').test_data(10); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_fleet_too_large_for_any_draw_still_gets_a_split_of_every_example() -> None:
    from workloads.data import dirichlet_split

    # 30 examples over 25 devices at alpha 0.05: no draw gives every device an example, so
    # the largest shares give theirs up; each example still goes to exactly one device.
    labels = np.repeat(np.arange(3), 10)
    parts = dirichlet_split(labels, 25, 0.05, np.random.default_rng(0))
    assert len(parts) == 25 and min(len(p) for p in parts) >= 1
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split(labels, 31, 0.05, np.random.default_rng(0))
