"""Data pipeline throughput: the training loader against a plain numpy memmap reader of the same
tokens, and `megalite-data prepare` in MB/s of text.

loader   TrainStream (mosaicml-streaming, shuffled, one process, num_workers=0) pinned to one core,
         in tokens/s, and a numpy memmap of the same samples read in a shuffled order into the
         same int64 (inputs, targets) tensors; the ratio loader / memmap is the cost of streaming.
prepare  the whole pipeline on the embedded Shakespeare corpus (5 MB) with 2 worker processes,
         with BPE training, with a given tokenizer (tokenize + pack + write only), and with BPE
         training plus the quality stages (near-dedup, PII, langid; docs/data.md).

Medians of --runs runs; rows go to benchmarks/results/data_{loader,prepare}.csv with the git SHA,
device and time.

    python benchmarks/bench_data.py [--runs 3] [--batches 300] [--skip-prepare]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from megalite.kernels import _bench

SEQ_LEN = 128
MICRO_BATCH = 16


def prepared(
    root: Path, workers: int, tokenizer: str | None = None, **stages: object
) -> tuple[Path, dict]:
    from megalite.data.prepare import PrepareOptions, prepare

    out = root / f"shakespeare-{time.time_ns()}"
    manifest = prepare(
        PrepareOptions(
            inputs=["shakespeare"],
            out=str(out),
            seq_len=SEQ_LEN,
            vocab_size=4096,
            tokenizer=tokenizer,
            workers=workers,
            progress=False,
            **stages,
        )
    )
    return out, manifest


def loader_tokens_per_s(data: Path, batches: int) -> float:
    from megalite.config import DataConfig
    from megalite.data.loader import TrainStream

    stream = TrainStream(DataConfig(dir=str(data), seq_len=SEQ_LEN), MICRO_BATCH, seed=0)
    next(stream)  # start-up (index, shared memory, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    gc.collect()
    return batches * MICRO_BATCH * SEQ_LEN / seconds


def memmap_tokens_per_s(samples: np.memmap, batches: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(samples))
    t0 = time.perf_counter()
    for b in range(batches):
        idx = np.sort(order[(b * MICRO_BATCH) % len(order) :][:MICRO_BATCH])
        tokens = torch.from_numpy(samples[idx].astype(np.int64))
        _ = (tokens[:, :-1], tokens[:, 1:])  # what the training loop receives
    seconds = time.perf_counter() - t0
    return batches * MICRO_BATCH * SEQ_LEN / seconds


def dump_memmap(data: Path, path: Path) -> np.memmap:
    """The train split's samples, in shard order, as one flat uint16 array on disk."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(data / "train"), shuffle=False, batch_size=1)
    rows = np.stack([ds.get_item(i)["tokens"] for i in range(ds.num_samples)])
    del ds
    out = np.memmap(path, dtype=rows.dtype, mode="w+", shape=rows.shape)
    out[:] = rows
    out.flush()
    return np.memmap(path, dtype=rows.dtype, mode="r", shape=rows.shape)


def bench_loader(root: Path, runs: int, batches: int) -> None:
    data, _ = prepared(root, workers=2)
    samples = dump_memmap(data, root / "samples.u16")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    torch.set_num_threads(1)
    loader = [loader_tokens_per_s(data, batches) for _ in range(runs)]
    memmap = [memmap_tokens_per_s(samples, batches, seed=r) for r in range(runs)]
    lo, mm = statistics.median(loader), statistics.median(memmap)
    _bench.write_rows(
        "data_loader",
        [
            {
                **_bench.provenance(),
                "seq_len": SEQ_LEN,
                "micro_batch": MICRO_BATCH,
                "batches": batches,
                "runs": runs,
                "loader_tokens_per_s_median": lo,
                "memmap_tokens_per_s_median": mm,
                "loader_over_memmap": lo / mm,
            }
        ],
    )


def bench_prepare(root: Path, runs: int) -> None:
    rows = []
    # The quality stages on top of BPE training: near-dedup, PII placeholders, language id.
    stages = {"near_dedup": True, "pii": True, "languages": ["en"]}
    for kind in ("train BPE", "given tokenizer", "train BPE + near-dedup, PII, langid"):
        mb_s, seconds, tokenizer = [], [], None
        if kind == "given tokenizer":
            first, _ = prepared(root, workers=2)
            tokenizer = str(first / "tokenizer.json")
        extra = stages if "near-dedup" in kind else {}
        for _ in range(runs):
            _, m = prepared(root, workers=2, tokenizer=tokenizer, **extra)
            mb_s.append(m["mb_per_s"])
            seconds.append(m["seconds"])
        rows.append(
            {
                **_bench.provenance(),
                "input": "shakespeare (42 plays)",
                "input_mb": round(m["bytes_in"] / 1e6, 2),
                "tokenizer": kind,
                "workers": 2,
                "runs": runs,
                "seconds_median": statistics.median(seconds),
                "mb_per_s_median": statistics.median(mb_s),
            }
        )
    _bench.write_rows("data_prepare", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--skip-prepare", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = tmp
        root = Path(tmp)
        if not args.skip_prepare:
            bench_prepare(root, args.runs)
        bench_loader(root, args.runs, args.batches)


if __name__ == "__main__":
    main()
