"""`megalite-data prepare`: raw text -> filtered, deduplicated documents -> tokenizer -> packed
samples -> mosaicml-streaming MDS shards + manifest.json (layout: `megalite/data/common.py`).

The inputs are read in three passes, so memory stays proportional to the number of documents,
never to their text:

1. scan: decode (non-UTF-8 policy), quality filters (`filters.py`), exact dedup of normalized
   text (first occurrence wins) and the document's split hash;
2. train the BPE tokenizer on the training documents (skipped when `--tokenizer` is given);
3. tokenize, pack (`pack.py`) and write the shards of each split.

Passes 1 and 3 run in `workers` processes on chunks of consecutive documents whose results are
consumed in input order, so the output is byte-identical for any number of workers.

The split is by document: the `val_fraction` of kept documents with the lowest hash of
(seed, key) go to validation (at least one, and at least one left for training), so no validation
text leaks into training and the split does not depend on the worker count or on where the corpus
sits on disk. Everything is written to a temporary dir that is renamed into place at the end: an
interrupted run leaves nothing half-written, and an existing dataset is replaced only with
`overwrite`. Every option and input is checked before the expensive work starts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megalite.data.common import (
    EOS,
    FORMAT,
    INDEX,
    MANIFEST,
    TOKENIZER,
    DataError,
    file_sha256,
    read_manifest,
)
from megalite.data.filters import FILTERS, FilterOptions, dedup_key, quality_verdict
from megalite.data.pack import Packer, SplitWriter, unigram_loss
from megalite.data.readers import (
    UTF8_POLICIES,
    InputFile,
    RawDoc,
    decode,
    discover,
    iter_raw,
    shakespeare_dir,
)
from megalite.data.tokenizer import load_tokenizer, train_bpe, vocab_size

__all__ = [
    "EOS",
    "MANIFEST",
    "TOKENIZER",
    "DataError",
    "PrepareOptions",
    "file_sha256",
    "prepare",
    "read_manifest",
    "shakespeare_dir",
]

TRAIN, VAL = 1, 2  # per-document decisions; 0 = dropped
CHUNK_DOCS = 256
CHUNK_BYTES = 1 << 20
VAL_NAMES_LISTED = 100


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: str
    seq_len: int = 128
    vocab_size: int = 4096
    val_fraction: float = 0.05
    # An existing tokenizer.json or tiktoken encoding file instead of training one.
    tokenizer: str | None = None
    tiktoken_pattern: str | None = None
    eos_token: str = EOS
    # Special tokens of a trained tokenizer (ids 0, 1, ...); eos_token is added if missing.
    special_tokens: list[str] = field(default_factory=lambda: [EOS])
    text_field: str = "text"  # JSON field / parquet column holding the text
    on_bad_utf8: str = "error"  # error | replace | skip
    filters: FilterOptions = field(default_factory=FilterOptions)
    dedup: bool = True
    doc_boundaries: bool = False  # also write a `doc_starts` column
    overwrite: bool = False
    compression: str | None = None  # any mosaicml-streaming compression, e.g. zstd
    shard_size_limit: int = 1 << 26
    seed: int = 0
    workers: int = 1
    progress: bool | None = None  # None: on when stderr is a terminal


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ validation
def _check_options(opts: PrepareOptions) -> Path:
    out = Path(opts.out)
    if opts.seq_len < 1:
        raise DataError(f"--seq-len={opts.seq_len} must be >= 1")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise DataError(f"--val-fraction={opts.val_fraction} must be in [0, 1)")
    if opts.workers < 1:
        raise DataError(f"--workers={opts.workers} must be >= 1")
    if opts.shard_size_limit < 1:
        raise DataError(f"--shard-size={opts.shard_size_limit} must be a positive byte count")
    if opts.on_bad_utf8 not in UTF8_POLICIES:
        raise DataError(
            f"--on-bad-utf8={opts.on_bad_utf8!r} is not one of {', '.join(UTF8_POLICIES)}"
        )
    if opts.compression is not None:
        from streaming.base.compression import get_compressions

        if opts.compression not in get_compressions():
            raise DataError(
                f"--compression={opts.compression!r} is not a mosaicml-streaming compression; "
                "use zstd, gz, br, bz2 or snappy (optionally with a level, e.g. zstd:7)"
            )
    opts.filters.validate()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not opts.overwrite:
        raise DataError(
            f"output dir {str(out)!r} already exists and is not empty; pass --overwrite to "
            "replace it, or choose another --out"
        )
    return out


def _special_tokens(opts: PrepareOptions) -> list[str]:
    specials = list(opts.special_tokens)
    if opts.eos_token not in specials:
        specials.insert(0, opts.eos_token)
    return specials


# --------------------------------------------------------------------------------- workers
# Per-process state of a worker (or of the main process when workers=1).
_WORKER: dict = {}


def _init_worker(ctx: dict) -> None:
    _WORKER.clear()
    _WORKER.update(ctx)
    if "tokenizer_json" in ctx:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(ctx["tokenizer_json"])
        # Text that spells a special token ("<|endoftext|>") is encoded as text, so EOS marks
        # document ends and nothing else.
        tok.encode_special_tokens = True
        _WORKER["tokenizer"] = tok


def _split_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _scan_chunk(docs: list[RawDoc]) -> list[tuple[str | None, bytes | None, int, bool]]:
    """Per document: the filter that drops it (or None), its dedup key, its split hash and
    whether bytes were replaced while decoding."""
    w = _WORKER
    out = []
    for doc in docs:
        text, replaced = decode(doc, w["text_field"], w["on_bad_utf8"])
        if text is None:
            out.append(("bad_utf8", None, 0, False))
            continue
        verdict = quality_verdict(text, w["filters"])
        key = dedup_key(text) if verdict is None and w["dedup"] else None
        out.append((verdict, key, _split_hash(w["seed"], doc.key), replaced))
    return out


def _tokenize_chunk(docs: list[tuple[int, RawDoc]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per split: the documents' tokens, each followed by EOS, concatenated, and their lengths."""
    w = _WORKER
    out = {}
    for split in (TRAIN, VAL):
        texts = []
        for s, doc in docs:
            if s == split:
                text, _ = decode(doc, w["text_field"], w["on_bad_utf8"])
                texts.append(text)
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


@contextmanager
def _worker_pool(workers: int, ctx: dict):
    """A pool of spawned processes (forking after tokenizers' threads ran is unsafe), or None to
    run in this process when workers == 1."""
    if workers == 1:
        saved = dict(_WORKER)
        _init_worker(ctx)
        try:
            yield None
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (ctx,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _ordered_map(pool, fn: Callable, chunks: Iterator[tuple[object, list]]) -> Iterator:
    """(meta, fn(chunk)) in input order, with a bounded number of chunks in flight (Pool.imap
    would read the whole input ahead)."""
    if pool is None:
        for meta, chunk in chunks:
            yield meta, fn(chunk)
        return
    pending: deque = deque()
    limit = 2 * pool._processes
    for meta, chunk in chunks:
        pending.append((meta, pool.apply_async(fn, (chunk,))))
        if len(pending) >= limit:
            meta0, result = pending.popleft()
            yield meta0, result.get()
    while pending:
        meta0, result = pending.popleft()
        yield meta0, result.get()


def _chunks(items: Iterator[tuple[object, int, int]]) -> Iterator[tuple[tuple[int, int], list]]:
    """Groups (item, size, progress) into chunks of up to CHUNK_DOCS items / CHUNK_BYTES bytes;
    meta is (number of items, progress after the chunk)."""
    chunk: list = []
    size = 0
    progress = 0
    for item, n, progress in items:
        chunk.append(item)
        size += n
        if len(chunk) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield (len(chunk), progress), chunk
            chunk, size = [], 0
    if chunk:
        yield (len(chunk), progress), chunk


def _size(doc: RawDoc) -> int:
    return len(doc.data) if doc.data is not None else 0


# -------------------------------------------------------------------------------- progress
class _Bars:
    """rich progress bars on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.progress.start()

    def add(self, description: str, total: int | None) -> int | None:
        return self.progress.add_task(description, total=total) if self.progress else None

    def update(self, task: int | None, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(task, completed=completed)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------- passes
@dataclass
class _Scan:
    decisions: bytearray  # per input document: 0 dropped, TRAIN, VAL
    split_hashes: list[int]  # per kept document
    documents_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    replaced_utf8: int = 0


def _scan(files: list[InputFile], opts: PrepareOptions, pool, bars: _Bars) -> _Scan:
    scan = _Scan(bytearray(), [])
    seen: set[bytes] = set()
    task = bars.add("scan + filter", sum(f.size for f in files))
    items = ((doc, _size(doc), pos) for doc, pos in iter_raw(files, opts.text_field))
    for (_, progress), results in _ordered_map(pool, _scan_chunk, _chunks(items)):
        for verdict, key, split_hash, replaced in results:
            scan.documents_in += 1
            if verdict is not None:
                scan.dropped[verdict] += 1
                scan.decisions.append(0)
            elif key is not None and key in seen:
                scan.duplicates += 1
                scan.decisions.append(0)
            else:
                if key is not None:
                    seen.add(key)
                scan.decisions.append(TRAIN)
                scan.split_hashes.append(split_hash)
                scan.replaced_utf8 += replaced
        bars.update(task, progress)
    return scan


def _nothing_left_error(opts: PrepareOptions, scan: _Scan) -> DataError:
    n = scan.documents_in
    drops = {k: v for k, v in scan.dropped.items() if v}
    if set(drops) <= {"empty", "bad_utf8"} and not scan.duplicates:
        utf8 = f", {drops['bad_utf8']} skipped as not UTF-8" if drops.get("bad_utf8") else ""
        return DataError(
            f"inputs {opts.inputs} hold no text ({n} documents, none with at least "
            f"{opts.filters.min_chars} non-blank characters{utf8}); point at files with text"
        )
    return DataError(
        f"every document of {opts.inputs} was filtered out ({n} in; dropped {drops}, "
        f"{scan.duplicates} duplicates); relax the quality filters "
        f"({opts.filters.enabled()})"
    )


def _assign_split(scan: _Scan, val_fraction: float) -> tuple[int, int]:
    kept = len(scan.split_hashes)
    if kept < 2 and val_fraction > 0:
        raise DataError(
            f"only {kept} document(s) after filtering; a by-document validation split needs "
            "at least 2 (add text, or pass --val-fraction 0)"
        )
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * kept))
    n_val = min(n_val, kept - 1)
    order = np.argsort(np.array(scan.split_hashes, dtype=np.uint64), kind="stable")
    is_val = np.zeros(kept, bool)
    is_val[order[:n_val]] = True
    k = 0
    for i, d in enumerate(scan.decisions):
        if d:
            if is_val[k]:
                scan.decisions[i] = VAL
            k += 1
    return kept - n_val, n_val


def _kept_docs(
    files: list[InputFile], opts: PrepareOptions, decisions: bytearray, only: int | None = None
) -> Iterator[tuple[int, RawDoc, int]]:
    """(split, raw document, progress) for every kept document (of one split if `only`)."""
    _check_unchanged(files)
    for i, (doc, progress) in enumerate(iter_raw(files, opts.text_field)):
        d = decisions[i]
        if d and (only is None or d == only):
            yield d, doc, progress


def _check_unchanged(files: list[InputFile]) -> None:
    for f in files:
        st = f.path.stat()
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise DataError(
                f"input {str(f.path)!r} changed while it was being prepared; re-run when "
                "nothing writes to the inputs"
            )


def _train_texts(files, opts, decisions, bars: _Bars) -> Iterator[str]:
    task = bars.add("train tokenizer", sum(f.size for f in files))
    for _, doc, progress in _kept_docs(files, opts, decisions, only=TRAIN):
        text, _ = decode(doc, opts.text_field, opts.on_bad_utf8)
        bars.update(task, progress)
        yield text


def _write_shards(
    files: list[InputFile],
    opts: PrepareOptions,
    decisions: bytearray,
    tmp: Path,
    vocab: int,
    pool,
    bars: _Bars,
) -> dict:
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
        for split, doc, progress in _kept_docs(files, opts, decisions):
            if split == VAL and len(val_names) < VAL_NAMES_LISTED:
                val_names.append(doc.key)
            yield (split, doc), _size(doc), progress

    try:
        for (_, progress), by_split in _ordered_map(pool, _tokenize_chunk, _chunks(items())):
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


def _shard_stats(split_dir: Path) -> dict:
    index = json.loads((split_dir / INDEX).read_text())
    shards = index["shards"]
    return {
        "shards": len(shards),
        "bytes": sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards),
        "index_sha256": file_sha256(split_dir / INDEX),
    }


# ----------------------------------------------------------------------------------- main
def prepare(opts: PrepareOptions) -> dict:
    """Runs the whole pipeline and returns the manifest. Raises DataError before writing
    anything when an input or option is bad, and leaves no output when anything fails."""
    t0 = time.time()
    # mosaicml-streaming, needed only to write the shards, takes seconds to import (it imports
    # torch and transformers): import it in the background while the inputs are scanned.
    threading.Thread(target=importlib.import_module, args=("streaming",), daemon=True).start()
    out = _check_options(opts)
    specials = _special_tokens(opts)
    files, ignored = discover(opts.inputs, opts.text_field)
    given_tokenizer = None
    if opts.tokenizer:
        given_tokenizer, tokenizer_kind = load_tokenizer(
            opts.tokenizer, specials, opts.tiktoken_pattern
        )
    elif opts.vocab_size < 256 + len(specials):
        raise DataError(
            f"--vocab-size={opts.vocab_size} is smaller than the 256 byte tokens plus "
            f"{len(specials)} special tokens; use at least 512"
        )
    bytes_in = sum(f.size for f in files)
    progress = sys.stderr.isatty() if opts.progress is None else opts.progress
    bars = _Bars(progress)
    ctx = {
        "text_field": opts.text_field,
        "on_bad_utf8": opts.on_bad_utf8,
        "filters": opts.filters,
        "dedup": opts.dedup,
        "seed": opts.seed,
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        with _worker_pool(opts.workers, ctx) as pool:
            scan = _scan(files, opts, pool, bars)
        if not scan.split_hashes:
            raise _nothing_left_error(opts, scan)
        n_train, n_val = _assign_split(scan, opts.val_fraction)

        if given_tokenizer is not None:
            tokenizer = given_tokenizer
            source = str(opts.tokenizer)
        else:
            texts = _train_texts(files, opts, scan.decisions, bars)
            tokenizer = train_bpe(texts, opts.vocab_size, specials, length=n_train)
            tokenizer_kind, source = "bpe", "trained"
        eos_id = tokenizer.token_to_id(opts.eos_token)
        if eos_id is None:
            raise DataError(
                f"the tokenizer has no {opts.eos_token!r} token; add it as a special token"
            )
        vocab = vocab_size(tokenizer)

        tmp.mkdir(parents=True)
        tokenizer.save(str(tmp / TOKENIZER))
        if tokenizer_kind == "tiktoken":
            shutil.copy(opts.tokenizer, tmp / "tokenizer.tiktoken")
        ctx.update(tokenizer_json=tokenizer.to_str(), eos_id=eos_id)
        with _worker_pool(opts.workers, ctx) as pool:
            packed = _write_shards(files, opts, scan.decisions, tmp, vocab, pool, bars)
        bars.close()
        if packed["samples"]["train"] == 0:
            raise DataError(
                f"the training split has {packed['tokens']['train']} tokens, fewer than one "
                f"sample of --seq-len={opts.seq_len} + 1; add text or lower --seq-len"
            )
        if opts.val_fraction > 0 and packed["samples"]["val"] == 0:
            raise DataError(
                f"the validation split has {packed['tokens']['val']} tokens, fewer than one "
                f"sample of --seq-len={opts.seq_len} + 1; raise --val-fraction or lower --seq-len"
            )
        if packed["samples"]["val"] == 0:
            shutil.rmtree(tmp / "val")
        splits = {s: _shard_stats(tmp / s) for s in ("train", "val") if (tmp / s).is_dir()}
        seconds = time.time() - t0
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": opts.inputs,
            "files": len(files),
            "files_ignored": ignored,
            "bytes_in": bytes_in,
            "documents_in": scan.documents_in,
            "documents_out": n_train + n_val,
            "dropped": {name: scan.dropped.get(name, 0) for name in FILTERS},
            "duplicates_removed": scan.duplicates,
            "utf8_replaced_documents": scan.replaced_utf8,
            "documents": {"train": n_train, "val": n_val},
            "val_documents": packed["val_documents"],
            "tokens": packed["tokens"],
            "tail_tokens_dropped": packed["tail_tokens_dropped"],
            "samples": packed["samples"],
            "shards": {s: v["shards"] for s, v in splits.items()},
            "shard_bytes": {s: v["bytes"] for s, v in splits.items()},
            "index_sha256": {s: v["index_sha256"] for s, v in splits.items()},
            "compression": opts.compression,
            "doc_boundaries": opts.doc_boundaries,
            "seq_len": opts.seq_len,
            "vocab_size": vocab,
            "eos_token": opts.eos_token,
            "eos_id": eos_id,
            "special_tokens": specials,
            "tokenizer": {"kind": tokenizer_kind, "source": source},
            "tokenizer_sha256": file_sha256(tmp / TOKENIZER),
            "unigram_val_loss": packed["unigram_val_loss"],
            "options": asdict(opts),
            "seconds": round(seconds, 2),
            "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{time.time_ns()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        bars.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
