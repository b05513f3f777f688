"""Passes 2 and 3 of `prepare`: the texts the tokenizer is trained on, then tokenize, pack and
write the MDS shards of each split, in worker processes, results consumed in input order.

The text of a kept document is read again from its input (memory holds decisions, not text)
and scrubbed of PII again when the scan did (scrubbing is deterministic), so what is tokenized
is exactly what was filtered and deduplicated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megalite.data.common import INDEX, DataError, file_sha256
from megalite.data.pack import Packer, SplitWriter, unigram_loss
from megalite.data.readers import InputFile, RawDoc, decode, iter_raw
from megalite.data.scan import ScanSettings, scrub_text
from megalite.data.tasks import TRAIN, VAL
from megalite.data.workers import WORKER, Bars, chunks, doc_size, ordered_map

if TYPE_CHECKING:
    from megalite.data.prepare import PrepareOptions

VAL_NAMES_LISTED = 100


def tokenize_chunk(docs: list[tuple[int, RawDoc]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per split: the documents' tokens, each followed by EOS, concatenated, and their lengths."""
    w = WORKER
    settings: ScanSettings = w["scan"]
    out = {}
    for split in (TRAIN, VAL):
        texts = []
        for s, doc in docs:
            if s == split:
                text, _ = decode(doc, settings.text_field, settings.on_bad_utf8)
                texts.append(scrub_text(text, settings))
        if not texts:
            continue
        encodings = w["tokenizer"].encode_batch(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
        tokens = np.empty(int(lengths.sum()), np.uint32)
        ends = np.cumsum(lengths)
        for e, end, n in zip(encodings, ends, lengths):
            tokens[end - n : end - 1] = e.ids
        tokens[ends - 1] = w["eos_id"]
        out[split] = (tokens, lengths)
    return out


def kept_docs(
    files: list[InputFile], text_field: str, decisions: bytearray, only: int | None = None
) -> Iterator[tuple[int, RawDoc, int]]:
    """(split, raw document, progress) for every kept document (of one split if `only`)."""
    check_unchanged(files)
    for i, (doc, progress) in enumerate(iter_raw(files, text_field)):
        d = decisions[i]
        if d and (only is None or d == only):
            yield d, doc, progress


def check_unchanged(files: list[InputFile]) -> None:
    for f in files:
        st = f.path.stat()
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise DataError(
                f"input {str(f.path)!r} changed while it was being prepared; re-run when "
                "nothing writes to the inputs"
            )


def train_texts(
    files: list[InputFile], settings: ScanSettings, decisions: bytearray, bars: Bars
) -> Iterator[str]:
    """The training documents' texts, as they will be tokenized."""
    task = bars.add("train tokenizer", sum(f.size for f in files))
    for _, doc, progress in kept_docs(files, settings.text_field, decisions, only=TRAIN):
        text, _ = decode(doc, settings.text_field, settings.on_bad_utf8)
        bars.update(task, progress)
        yield scrub_text(text, settings)


def write_shards(
    files: list[InputFile],
    opts: PrepareOptions,
    decisions: bytearray,
    tmp: Path,
    vocab: int,
    pool,
    bars: Bars,
) -> dict:
    """Tokenizes the kept documents, packs them and writes each split's MDS shards."""
    packers = {s: Packer(opts.seq_len, opts.doc_boundaries) for s in (TRAIN, VAL)}
    writers = {
        s: SplitWriter(
            tmp / name,
            opts.seq_len,
            vocab,
            opts.compression,
            opts.shard_size_limit,
            opts.doc_boundaries,
        )
        for s, name in ((TRAIN, "train"), (VAL, "val"))
    }
    val_names: list[str] = []
    task = bars.add("tokenize + pack", sum(f.size for f in files))

    def items():
        for split, doc, progress in kept_docs(files, opts.text_field, decisions):
            if split == VAL and len(val_names) < VAL_NAMES_LISTED:
                val_names.append(doc.key)
            yield (split, doc), doc_size(doc), progress

    try:
        for (_, progress), by_split in ordered_map(pool, tokenize_chunk, chunks(items())):
            for split, (tokens, lengths) in by_split.items():
                samples, starts = packers[split].add(tokens, lengths)
                writers[split].write(samples, starts)
            bars.update(task, progress)
    finally:
        for w in writers.values():
            w.close()
    return {
        "tokens": {"train": packers[TRAIN].tokens, "val": packers[VAL].tokens},
        "tail_tokens_dropped": {"train": packers[TRAIN].tail, "val": packers[VAL].tail},
        "samples": {"train": writers[TRAIN].samples, "val": writers[VAL].samples},
        "val_documents": val_names,
        "unigram_val_loss": unigram_loss(writers[TRAIN].target_counts, writers[VAL].target_counts),
    }


def shard_stats(split_dir: Path) -> dict:
    index = json.loads((split_dir / INDEX).read_text())
    shards = index["shards"]
    return {
        "shards": len(shards),
        "bytes": sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards),
        "index_sha256": file_sha256(split_dir / INDEX),
    }
