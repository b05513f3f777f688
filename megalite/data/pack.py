"""Packing: documents joined with EOS, cut into fixed-length samples, written as MDS shards.

Each split is one token stream `doc_1 EOS doc_2 EOS ...` cut into samples of seq_len + 1 tokens
with a stride of seq_len: the last token of a sample is the first of the next, so every token is
a target exactly once and nothing is padded. Only the ragged tail (fewer than seq_len + 1 tokens
left) is dropped.

With `doc_starts` on, each sample also records the offsets (0..seq_len) at which a document
starts inside it, for document-masked attention; offset 0 is listed only when the sample begins
exactly at a document start. Column types:

    tokens      ndarray:uint16:(seq_len + 1)  (uint32 when the vocabulary exceeds 65536)
    doc_starts  ndarray:uint16 (variable length; uint32 when seq_len + 1 exceeds 65535)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


class Packer:
    """Turns a sequence of tokenized documents into (seq_len + 1)-token samples, carrying the
    unfinished tail from one call to the next."""

    def __init__(self, seq_len: int, doc_starts: bool) -> None:
        self.seq_len = seq_len
        self.record_starts = doc_starts
        self.buf = np.empty(0, np.uint32)
        self.buf_pos = 0  # stream position of buf[0]
        self.starts = np.empty(0, np.int64)  # stream positions of document starts >= buf_pos
        self.tokens = 0  # tokens seen (documents + their EOS)

    def add(
        self, tokens: np.ndarray, doc_lengths: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Appends documents (concatenated, each ending with EOS; `doc_lengths` include the EOS)
        and returns the samples completed so far, with their document starts if recorded."""
        L = self.seq_len
        if self.record_starts and len(doc_lengths):
            first = self.buf_pos + len(self.buf)
            new = first + np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
            self.starts = np.concatenate([self.starts, new.astype(np.int64)])
        self.buf = np.concatenate([self.buf, tokens.astype(np.uint32, copy=False)])
        self.tokens += len(tokens)
        n = (len(self.buf) - 1) // L if len(self.buf) > L else 0
        if n == 0:
            return np.empty((0, L + 1), np.uint32), [] if self.record_starts else None
        samples = self.buf[np.arange(n)[:, None] * L + np.arange(L + 1)[None, :]]
        starts = None
        if self.record_starts:
            begin = self.buf_pos + np.arange(n, dtype=np.int64) * L
            lo = np.searchsorted(self.starts, begin, side="left")
            hi = np.searchsorted(self.starts, begin + L, side="right")
            starts = [self.starts[a:b] - s for a, b, s in zip(lo, hi, begin)]
        self.buf = self.buf[n * L :]
        self.buf_pos += n * L
        if self.record_starts:
            self.starts = self.starts[np.searchsorted(self.starts, self.buf_pos, side="left") :]
        return samples, starts

    @property
    def tail(self) -> int:
        """Tokens not in any sample (the ragged end of the stream)."""
        return len(self.buf) - 1 if len(self.buf) else 0


class SplitWriter:
    """Writes one split's samples as MDS shards (sha1 hashes on) and counts target tokens for
    the unigram baseline."""

    def __init__(
        self,
        out: Path,
        seq_len: int,
        vocab_size: int,
        compression: str | None,
        size_limit: int,
        doc_starts: bool,
    ) -> None:
        from streaming import MDSWriter

        self.dtype = token_dtype(vocab_size)
        columns = {"tokens": f"ndarray:{self.dtype}:{seq_len + 1}"}
        if doc_starts:
            columns["doc_starts"] = "json"
        self.writer = MDSWriter(
            out=str(out),
            columns=columns,
            compression=compression,
            hashes=["sha1"],
            size_limit=size_limit,
            progress_bar=False,
        )
        self.target_counts = np.zeros(vocab_size, np.int64)
        self.samples = 0

    def write(self, samples: np.ndarray, doc_starts: list[np.ndarray] | None) -> None:
        rows = samples.astype(self.dtype)
        if doc_starts is None:
            for row in rows:
                self.writer.write({"tokens": row})
        else:
            for row, starts in zip(rows, doc_starts):
                self.writer.write({"tokens": row, "doc_starts": starts.tolist()})
        if len(samples):
            self.target_counts += np.bincount(
                samples[:, 1:].ravel(), minlength=len(self.target_counts)
            )
        self.samples += len(samples)

    def close(self) -> None:
        self.writer.finish()


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float | None:
    """Cross-entropy (nats/token) of the val targets under the train unigram distribution with
    add-one smoothing: the loss of a model that ignores context, the bar a LM must clear."""
    if val_counts.sum() == 0:
        return None
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-(val_counts * logp).sum() / val_counts.sum())
