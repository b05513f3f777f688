"""Near-duplicate removal: MinHash signatures of word n-gram shingles, banded LSH to find
candidate pairs, the pairs checked against the Jaccard threshold, and one document kept per
cluster (datasketch's `MinHash` and `MinHashLSH`).

Parameters and what they target (`NearDedupOptions`):

- `ngram` (5): shingles are runs of `ngram` consecutive words of the normalized text (NFKC, lower
  case, punctuation dropped). Two documents' similarity is the Jaccard index of their shingle
  sets. Editing a fraction e of the words (scattered) keeps about (1-e)^n of the shingles, so a
  copy's Jaccard is about (1-e)^n / (2 - (1-e)^n): for n = 5, 2 % edits -> 0.82, 5 % -> 0.63,
  10 % -> 0.42 (measured on Shakespeare: 10 % edits gave 0.29-0.55). Unrelated text shares almost
  no 5-grams (< 0.01 between any two 300-word passages of the plays), so a low threshold costs
  little precision on natural text; templated pages share more.
- `threshold` (0.8): pairs whose estimated Jaccard is at least this are duplicates. 0.8 catches
  copies with about 2 % of words changed; 0.3 those with up to about 10 % (tests/data: recall
  >= 0.9 and precision 1.0 at 0.3 on copies with 5-10 % of words replaced, a paragraph pair
  swapped and a new header and footer).
- `num_perm` (128): permutations of the signature. The estimate's standard error is
  sqrt(J (1 - J) / num_perm), 0.035 at J = 0.5.
- bands x rows: datasketch picks b bands of r rows (b * r <= num_perm) minimizing the weighted
  false-positive and false-negative areas under the S-curve 1 - (1 - s^r)^b around the threshold.
  Candidates are then checked against the threshold with the full signature, so a false
  candidate costs one comparison and a missed one a duplicate: false negatives weigh
  `FN_WEIGHT` = 0.8. With 128 permutations that gives 0.8 -> 12 x 10, 0.7 -> 18 x 7,
  0.5 -> 30 x 4, 0.3 -> 42 x 3 (`lsh_params`; the manifest records the pair used).

Clusters are the connected components of the duplicate pairs (union-find); the document that
comes first in input order is kept and every other member is removed with `match` = the kept
document. The result depends only on the signatures and the input order, never on how the
documents were split over tasks or workers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megalite.data.common import DataError

SEED = 1  # fixed: signatures computed by different tasks must be comparable
FN_WEIGHT = 0.8
_WORD = re.compile(r"\w+")


@dataclass
class NearDedupOptions:
    enabled: bool = False
    threshold: float = 0.8
    ngram: int = 5
    num_perm: int = 128

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise DataError(
                f"--near-dedup-threshold={self.threshold} must be a Jaccard similarity in (0, 1]"
            )
        if self.ngram < 1:
            raise DataError(f"--near-dedup-ngram={self.ngram} must be >= 1")
        if self.num_perm < 16:
            raise DataError(
                f"--near-dedup-num-perm={self.num_perm} must be >= 16 (128 is the default)"
            )


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) datasketch chooses for this threshold and signature length."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(1 - FN_WEIGHT, FN_WEIGHT))
    return lsh.b, lsh.r


def shingles(text: str, ngram: int) -> list[bytes]:
    words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    if len(words) < ngram:  # a short document is one shingle
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)})


_PERMUTATIONS: dict[int, object] = {}


def signature(text: str, ngram: int, num_perm: int) -> np.ndarray:
    """The MinHash signature (uint32[num_perm]) of the text's shingles."""
    import xxhash
    from datasketch import MinHash

    # Drawing the permutations costs ~1 ms, twice the hashing of a page of text: once per process.
    perms = _PERMUTATIONS.get(num_perm)
    kw = dict(num_perm=num_perm, seed=SEED, hashfunc=xxhash.xxh32_intdigest, scheme="affine32")
    m = MinHash(**kw) if perms is None else MinHash(**kw, permutations=perms)
    _PERMUTATIONS[num_perm] = m.permutations
    m.update_batch(shingles(text, ngram))
    return np.asarray(m.hashvalues, dtype=np.uint32)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index is the root: the kept document is the first one
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicates(
    signatures: np.ndarray,
    opts: NearDedupOptions,
    progress=None,
) -> dict[int, int]:
    """{index of a removed document: index of the kept one of its cluster}, for rows of
    `signatures` (uint32[n, num_perm], in input order). `progress(i)` is called as rows are
    indexed and queried."""
    from datasketch import LeanMinHash, MinHashLSH

    n = len(signatures)
    if n < 2:
        return {}
    lsh = MinHashLSH(
        threshold=opts.threshold,
        num_perm=opts.num_perm,
        weights=(1 - FN_WEIGHT, FN_WEIGHT),
    )
    hashes = [LeanMinHash(seed=SEED, hashvalues=signatures[i], scheme="affine32") for i in range(n)]
    with lsh.insertion_session() as session:
        for i, h in enumerate(hashes):
            session.insert(i, h, check_duplication=False)
            if progress is not None and i % 1024 == 0:
                progress(i // 2)
    uf = _UnionFind(n)
    for i, h in enumerate(hashes):
        candidates = [j for j in lsh.query(h) if j > i]
        if candidates:
            similar = (signatures[candidates] == signatures[i]).mean(axis=1) >= opts.threshold
            for j, ok in zip(candidates, similar):
                if ok:
                    uf.union(i, j)
        if progress is not None and i % 1024 == 0:
            progress(n // 2 + i // 2)
    return {i: root for i in range(n) if (root := uf.find(i)) != i}


def stack(signatures: Sequence[np.ndarray], num_perm: int) -> np.ndarray:
    if not signatures:
        return np.zeros((0, num_perm), np.uint32)
    return np.stack(signatures)
