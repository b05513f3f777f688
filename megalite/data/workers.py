"""Worker processes, ordered chunked maps and progress bars shared by the passes of `prepare`.

Work is cut into chunks of consecutive documents (at most CHUNK_DOCS documents or CHUNK_BYTES
bytes) that run in `workers` spawned processes and whose results are consumed in input order, so
every output is byte-identical for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from megalite.data.readers import RawDoc

CHUNK_DOCS = 256
CHUNK_BYTES = 1 << 20

# Per-process state of a worker (or of the main process when workers=1): the context the pool
# was started with, plus what the passes load lazily from it (tokenizer, language and quality
# models).
WORKER: dict = {}


def init_worker(ctx: dict) -> None:
    WORKER.clear()
    WORKER.update(ctx)
    if "tokenizer_json" in ctx:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(ctx["tokenizer_json"])
        # Text that spells a special token ("<|endoftext|>") is encoded as text, so EOS marks
        # document ends and nothing else.
        tok.encode_special_tokens = True
        WORKER["tokenizer"] = tok


@contextmanager
def worker_pool(workers: int, ctx: dict):
    """A pool of spawned processes (forking after tokenizers' threads ran is unsafe), or None to
    run in this process when workers == 1."""
    if workers == 1:
        saved = dict(WORKER)
        init_worker(ctx)
        try:
            yield None
        finally:
            WORKER.clear()
            WORKER.update(saved)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    pool = multiprocessing.get_context("spawn").Pool(workers, init_worker, (ctx,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def ordered_map(pool, fn: Callable, chunks: Iterator[tuple[object, list]]) -> Iterator:
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


def chunks(items: Iterator[tuple[object, int, int]]) -> Iterator[tuple[tuple[int, int], list]]:
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


def doc_size(doc: RawDoc) -> int:
    return len(doc.data) if doc.data is not None else 0


class Bars:
    """rich progress bars on stderr, or nothing. `bytes_=False` bars count items, not bytes."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.progress.start()

    def add(self, description: str, total: int | None, unit: str = "bytes") -> int | None:
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, unit=unit)

    def update(self, task: int | None, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(task, completed=completed)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
