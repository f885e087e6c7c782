"""Debian's fortunes corpus as a 4-class text classification set (quote -> fortune category)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Label order is part of the exported manifest: label i is CATEGORIES[i] on every device.
CATEGORIES = ("computers", "politics", "science", "work")
SPLIT_SEED = 20240
TEST_FRACTION = 0.2

# Some quotes underline or embolden text the way line printers did: "_\bX", "X\bX", or
# "___\b\b\bword" (a run of backspaces). Backspaces are noise for a tokenizer, so each one is
# dropped together with the character it erases, keeping the character printed over it.
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
# A quote ends at a line holding only "%" (the strfile format the fortune program reads).
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)


def read_category(category: str, root: Path = FORTUNES_DIR) -> list[str]:
    """The quotes of one category file, in file order, whitespace-stripped, empty ones skipped.

    Args:
        category: File name inside `root`, e.g. "computers".
        root: Folder of Debian's fortunes package.

    Returns:
        The quotes as strings.

    Raises:
        FileNotFoundError: The category file is not installed.
    """
    path = root / category
    if not path.is_file():
        raise FileNotFoundError(
            f"fortunes category {category!r} not found at {path}: "
            "install Debian's corpus with `apt-get install fortunes`"
        )
    return read_quotes(path)


def read_quotes(path: Path) -> list[str]:
    """The quotes of one strfile-format file, in file order, whitespace-stripped, empty skipped."""
    # English files are ASCII, the other languages' UTF-8; "replace" keeps a stray byte from
    # stopping a whole federation.
    text = path.read_bytes().decode("utf-8", errors="replace")
    quotes = (_strip_overstrike(quote).strip() for quote in _SEPARATOR.split(text))
    return [quote for quote in quotes if quote]


def _strip_overstrike(text: str) -> str:
    # A run of n backspaces erases the n characters before it; one pass removes only the
    # innermost pair, so repeat until the text stops changing.
    while True:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            return stripped
        text = stripped


def load_fortunes(
    categories: tuple[str, ...] = CATEGORIES, root: Path = FORTUNES_DIR
) -> tuple[list[str], np.ndarray]:
    """All quotes of `categories`, labelled by the category's position in the tuple.

    Args:
        categories: Category file names; label i is categories[i].
        root: Folder of Debian's fortunes package.

    Returns:
        (texts, labels): texts in category order then file order (deterministic), labels int64.

    Raises:
        FileNotFoundError: A category file is not installed.
    """
    texts: list[str] = []
    labels: list[int] = []
    for label, category in enumerate(categories):
        quotes = read_category(category, root)
        texts.extend(quotes)
        labels.extend([label] * len(quotes))
    return texts, np.asarray(labels, dtype=np.int64)


def train_test_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split into train and test indices.

    Stratified so that the smaller categories keep their share in the test set; the same seed
    always gives the same split, so every process (aggregator, devices, benchmarks) agrees.

    Args:
        labels: (N,) integer labels.
        test_fraction: Share of each class that goes to the test set.
        seed: Seed of the shuffle.

    Returns:
        (train_index, test_index): sorted int64 index arrays that partition range(N).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(test_fraction * len(members)))
        test.append(members[:cut])
        train.append(members[cut:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(test)).astype(np.int64))
