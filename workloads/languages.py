"""Debian's fortunes in four other languages as a language-identification set (quote -> language)."""

# The second text task of the multi-task (FL-TAC) federations: the same MiniLM encoder and 4-way
# head as the topic task (English fortunes categories), on different quotes and labels.

from __future__ import annotations

from pathlib import Path

import numpy as np

from workloads.fortunes import FORTUNES_DIR, read_quotes

# Debian packages fortunes-de, fortunes-es, fortunes-it, fortunes-pl; label i is LANGUAGES[i].
LANGUAGES = ("de", "es", "it", "pl")
# Quotes kept per language (a seeded sample): about an English category's size, so neither task
# dwarfs the other and tokenizing stays quick.
PER_LANGUAGE = 750
MIN_CHARS = 20  # shorter "quotes" are mostly signatures and ASCII-art fragments
_SAMPLE_SEED = 20241


def language_files(language: str, root: Path = FORTUNES_DIR) -> list[Path]:
    """The quote files of one language package, sorted (its `.dat` indexes and `.u8` copies left out).

    Raises:
        FileNotFoundError: The language's package is not installed.
    """
    folder = root / language
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(
            f"no {language} fortunes in {folder}: install them with "
            f"`apt-get install fortunes-{language}`")
    return files


def load_languages(
    languages: tuple[str, ...] = LANGUAGES, root: Path = FORTUNES_DIR,
    per_language: int = PER_LANGUAGE,
) -> tuple[list[str], np.ndarray]:
    """`per_language` distinct quotes of each language (a fixed sample), labelled by position.

    Returns:
        (texts, labels): texts in language order, labels int64.
    """
    texts: list[str] = []
    labels: list[int] = []
    rng = np.random.default_rng(_SAMPLE_SEED)
    for label, language in enumerate(languages):
        quotes = sorted({q for path in language_files(language, root) for q in read_quotes(path)
                         if len(q) >= MIN_CHARS})
        picked = rng.permutation(len(quotes))[:per_language]
        texts.extend(quotes[i] for i in sorted(picked))
        labels.extend([label] * len(picked))
    return texts, np.asarray(labels, dtype=np.int64)
