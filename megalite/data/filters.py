"""Document quality filters and the exact-duplicate key.

The heuristics are those of Gopher (Rae et al. 2021, appendix A.1.1), each optional:

- words per document in [min_words, max_words] (words are whitespace-separated tokens);
- mean word length (characters) in [min_mean_word_length, max_mean_word_length];
- symbol-to-word ratio (hash signs plus ellipses, per word) at most max_symbol_word_ratio;
- fraction of lines ending in an ellipsis at most max_ellipsis_line_fraction;
- fraction of lines starting with a bullet at most max_bullet_line_fraction.

`GOPHER` holds the published thresholds. A document with fewer than `min_chars` non-blank
characters is dropped as `empty` whatever the rest. A dropped document is counted under the first
filter it fails, in the order of `FILTERS`.

Exact deduplication hashes a normalized form of each document (Unicode NFKC, lower case,
whitespace runs collapsed), so documents differing only in case or spacing count as duplicates.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass

from megalite.data.common import DataError

# Drop reasons, in the order they are checked (`bad_utf8` is decided while decoding).
FILTERS = (
    "bad_utf8",
    "empty",
    "min_words",
    "max_words",
    "mean_word_length",
    "symbol_word_ratio",
    "ellipsis_lines",
    "bullet_lines",
)
ELLIPSES = ("...", "\u2026")
BULLETS = ("\u2022", "\u25cf", "\u25cb", "\u25aa", "\u25ab", "\u25a0", "\u25a1", "\u2023",
           "\u2043", "\u25e6", "-", "*")  # fmt: skip


@dataclass
class FilterOptions:
    min_chars: int = 1
    min_words: int | None = None
    max_words: int | None = None
    min_mean_word_length: float | None = None
    max_mean_word_length: float | None = None
    max_symbol_word_ratio: float | None = None
    max_ellipsis_line_fraction: float | None = None
    max_bullet_line_fraction: float | None = None

    def validate(self) -> None:
        """Raises DataError naming the CLI option when a threshold is impossible."""
        if self.min_chars < 0:
            raise DataError(f"--min-chars={self.min_chars} must be >= 0")
        for name in ("min_words", "max_words"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DataError(f"--{name.replace('_', '-')}={value} must be >= 0")
        if self.min_words is not None and self.max_words is not None:
            if self.min_words > self.max_words:
                raise DataError(
                    f"--min-words={self.min_words} > --max-words={self.max_words}; "
                    "the range keeps no document"
                )
        lo, hi = self.min_mean_word_length, self.max_mean_word_length
        if lo is not None and hi is not None and lo > hi:
            raise DataError(f"--mean-word-length range [{lo}, {hi}] is empty; give MIN <= MAX")
        for name in (
            "max_symbol_word_ratio",
            "max_ellipsis_line_fraction",
            "max_bullet_line_fraction",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DataError(f"--{name.replace('_', '-')}={value} must be >= 0")
        for name in ("max_ellipsis_line_fraction", "max_bullet_line_fraction"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise DataError(
                    f"--{name.replace('_', '-')}={value} is a fraction of lines; give a value "
                    "in [0, 1]"
                )

    def enabled(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


GOPHER = FilterOptions(
    min_words=50,
    max_words=100_000,
    min_mean_word_length=3.0,
    max_mean_word_length=10.0,
    max_symbol_word_ratio=0.1,
    max_ellipsis_line_fraction=0.3,
    max_bullet_line_fraction=0.9,
)


def quality_verdict(text: str, opts: FilterOptions) -> str | None:
    """The name of the first filter `text` fails, or None if it passes them all."""
    if opts.min_chars and len(text.strip()) < opts.min_chars:
        return "empty"
    words = text.split()
    n_words = len(words)
    if opts.min_words is not None and n_words < opts.min_words:
        return "min_words"
    if opts.max_words is not None and n_words > opts.max_words:
        return "max_words"
    if opts.min_mean_word_length is not None or opts.max_mean_word_length is not None:
        mean = sum(map(len, words)) / n_words if n_words else 0.0
        if opts.min_mean_word_length is not None and mean < opts.min_mean_word_length:
            return "mean_word_length"
        if opts.max_mean_word_length is not None and mean > opts.max_mean_word_length:
            return "mean_word_length"
    if opts.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols > opts.max_symbol_word_ratio * max(n_words, 1):
            return "symbol_word_ratio"
    if opts.max_ellipsis_line_fraction is not None or opts.max_bullet_line_fraction is not None:
        lines = [line for line in text.splitlines() if line.strip()]
        n_lines = max(len(lines), 1)
        if opts.max_ellipsis_line_fraction is not None:
            ellipsis = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
            if ellipsis > opts.max_ellipsis_line_fraction * n_lines:
                return "ellipsis_lines"
        if opts.max_bullet_line_fraction is not None:
            bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
            if bullets > opts.max_bullet_line_fraction * n_lines:
                return "bullet_lines"
    return None


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def dedup_key(text: str) -> bytes:
    """16-byte hash of the normalized text: equal for exact duplicates up to case and spacing."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()
