"""Shared plumbing for ``benchmarks/bench_*.py``: CSV rows with provenance, timing, peak memory.

Every row carries the git SHA, the device name and a UTC timestamp; timings and memory are medians
over several runs. On CUDA, time comes from ``triton.testing.do_bench`` and memory from
``torch.cuda.max_memory_allocated``. On CPU, peak memory is the peak resident set size of a fresh
subprocess minus its size just before the measured call, which counts every allocation the path
makes (tensor temporaries included) without instrumenting PyTorch.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from megalite.bench_report import git_sha
from megalite.metrics import device_name

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def provenance() -> dict[str, str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(device),
    }


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Writes ``rows`` to a new CSV at ``path`` (columns: every key, in first-seen order) and
    prints where: the one-file-per-run results of ``benchmarks/bench_*.py``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def write_rows(name: str, rows: Sequence[dict[str, Any]], out_dir: Path | None = None) -> Path:
    """Append rows to ``<out_dir>/<name>.csv`` (header written once) and print them as a table."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    fields = list(rows[0])
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    widths = {k: max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in fields}
    print("  ".join(k.ljust(widths[k]) for k in fields))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(widths[k]) for k in fields))
    print(f"-> {path}")
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cuda_time_and_memory(fn: Callable[[], Any], runs: int = 5) -> tuple[float, float]:
    """(median ms, median peak MiB above the starting allocation) of ``fn`` on CUDA."""
    import triton.testing

    times, peaks = [], []
    for _ in range(runs):
        times.append(triton.testing.do_bench(fn, warmup=5, rep=20))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
    return statistics.median(times), statistics.median(peaks)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_in_fresh_process(script: str | Path, args: Sequence[str]) -> dict[str, Any]:
    """Run ``python script *args`` and parse the JSON object its last stdout line prints."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(description: str, bench_cuda, check_cpu) -> None:
    """The shared entry point of the per-op benchmarks: time on CUDA, check numerics on a CPU."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if torch.cuda.is_available():
        bench_cuda(args.runs)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton
        check_cpu()
