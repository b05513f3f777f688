"""`megalite-bench`: step time, tokens/s, TFLOP/s, MFU, HFU and peak memory over a grid of
model x parallel layout x seq len x micro-batch x kernel backends x compile x checkpointing.

    megalite-bench                                     # conf/bench/cpu_smoke.yaml
    megalite-bench --config gpu_node                   # conf/bench/gpu_node.yaml, one 8-GPU node
    megalite-bench 'grid.seq_len=[128,256]' measure_steps=20 --dry-run
    torchrun --nproc_per_node=8 -m megalite.bench --config gpu_node     # every cell on 8 ranks
    srun -N4 --ntasks-per-node=1 torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD:29500 -m megalite.bench --config gpu_node  # 32 ranks, 4 nodes

Each cell builds a real `Trainer` (the same code path as `megalite-train`), runs `warmup_steps`
untimed steps, then times `measure_steps` calls of `Trainer.train_step` (the slowest rank's time
per step). Started plainly, the runner is a driver: one-rank cells run one after the other in its
process, multi-rank cells each in their own `torchrun --standalone` job of `nproc` ranks. Started
under torchrun or srun, every rank walks the grid together at that world size (cells whose layout
does not fit the world size are skipped with the config error).

The grid, its cells and the datasets they read are megalite/bench_grid.py. Cells whose backend
cannot run here (Triton kernels and flash-attn on a CPU, a missing package) or whose config is
invalid are reported as skipped, with the reason.

Outputs, in `out_dir`: results.csv (one row per cell with git SHA, device, world size, timestamp,
every setting, median / p20 / p80 step time, tokens/s and TFLOP/s per device, MFU, HFU, peak and
planned memory), results.md (the same as a table) and results.png.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megalite import cli_args
from megalite.bench_grid import (
    BenchConfig,
    Cell,
    compose_bench,
    data_dir_for,
    ensure_data,
    expand,
    skip_reason,
)
from megalite.bench_report import git_sha, markdown_table, write_outputs
from megalite.devices import resolve_precision
from megalite.errors import MegaliteError, cli_error


# ---------------------------------------------------------------------------- measuring
def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap back to the OS, so the next cell's peak RSS starts low
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _current_memory_gb(device: torch.device) -> float:
    """Allocated accelerator memory, or this process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _max_over_ranks(values: list[float], info) -> list[float]:
    """Each value's maximum over the ranks (a collective on the run's device)."""
    return info.all_reduce(info.tensor(values, torch.float64), "max").tolist()


def run_cell(cell: Cell, bench: BenchConfig, data_dir: Path, run_dir: Path, peak: dict) -> dict:
    """Builds a Trainer for the cell and times its steps; every rank calls this. Returns the
    measured columns (status ok), or status skipped / failed with the reason."""
    from megalite.compose import compose_config
    from megalite.metrics import Peak, mfu_warning, peak_memory_gb, reset_peak_memory
    from megalite.parallel.distributed import pick_device
    from megalite.shapes import flops_per_token, hardware_flops_per_token, param_count
    from megalite.trainer import Trainer

    overrides = [*cell.overrides(bench, data_dir, run_dir), f"logging.peak_tflops={peak['tflops']}"]
    device = pick_device(bench.device, int(os.environ.get("LOCAL_RANK", "0")))
    # The cell's peak memory: from just before its Trainer is built to its last step.
    _release_memory(device)
    reset_peak_memory(device)
    start_gb = _current_memory_gb(device)
    try:
        cfg = compose_config(overrides)
        trainer = Trainer(cfg)
    except MegaliteError as e:
        return {"status": "skipped", "reason": str(e).splitlines()[0]}
    try:
        for _ in range(bench.warmup_steps):
            trainer.train_step()
        times, loss = [], float("nan")
        for _ in range(bench.measure_steps):
            t0 = time.perf_counter()
            loss = trainer.train_step().loss
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak_gb = peak_memory_gb(device)
        *times, mem, growth = _max_over_ranks([*times, peak_gb, peak_gb - start_gb], trainer.dist)
        world = trainer.dist.world_size
        tokens = trainer.global_batch * cfg.data.seq_len
        # The trainer's config has `auto` backends resolved for this device.
        resolved = trainer.cfg
        plan = trainer.memory_plan
    finally:
        trainer.close()
        del trainer
        _release_memory(device)
    # MFU and HFU share the denominator; they differ by what activation checkpointing recomputes.
    median = percentile(times, 50)
    tok_s_dev = tokens / median / world
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    hfpt = hardware_flops_per_token(cfg.model, cfg.data.seq_len, cell.activation_checkpointing)
    mfu = fpt * tok_s_dev / 1e12 / peak["tflops"]
    warning = mfu_warning(mfu, Peak(peak["tflops"], peak["source"], peak["device"]))
    backends = {
        "attention": (cell.attention, resolved.model.attention),
        "norm": (cell.norm, resolved.model.norm),
        "loss": (cell.loss, resolved.train.loss),
    }
    return {
        **{k: f"auto ({used})" for k, (asked, used) in backends.items() if asked != used},
        "status": "ok",
        "reason": warning or "",
        "precision": resolved.train.precision,  # `auto` made concrete by the trainer's preflight
        "world_size": world,
        "n_params": param_count(cfg.model),
        "global_batch": tokens // cfg.data.seq_len,
        "step_time_median_s": median,
        "step_time_p20_s": percentile(times, 20),
        "step_time_p80_s": percentile(times, 80),
        "tokens_per_s_per_device": tok_s_dev,
        "tflops_per_device": fpt * tok_s_dev / 1e12,
        "mfu": mfu,
        "hfu": hfpt * tok_s_dev / 1e12 / peak["tflops"],
        "peak_mem_gb": mem,
        "mem_growth_gb": growth,
        "plan_mem_gb": plan.total_gb(),
        "final_loss": loss,
    }


# ------------------------------------------------------------------------------ running
def _row(cell: Cell, bench: BenchConfig, common: dict, result: dict) -> dict:
    return {
        **common,
        **asdict(cell),
        "label": cell.label(),
        "precision": bench.precision,
        "warmup_steps": bench.warmup_steps,
        "measure_steps": bench.measure_steps,
        **result,
    }


def _resolve_peak(bench: BenchConfig) -> dict:
    from megalite.metrics import resolve_peak
    from megalite.parallel.distributed import pick_device

    device = pick_device(bench.device, int(os.environ.get("LOCAL_RANK", "0")))
    precision, _ = resolve_precision(bench.precision, device.type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    p = resolve_peak(device, dtype, bench.peak_tflops)
    return {"tflops": p.tflops, "source": p.source, "device": p.device_name, "type": device.type}


def run_launched(bench: BenchConfig, cells: list[Cell], out: Path, peak: dict | None) -> list[dict]:
    """Every rank of a torchrun / srun job runs every cell together at the job's world size."""
    from megalite.parallel.distributed import barrier, init_distributed, shutdown

    info = init_distributed(bench.device, "auto", 1800)
    if bench.cpu_threads:
        torch.set_num_threads(bench.cpu_threads)
    try:
        if peak is None:
            peak = info.broadcast_object(_resolve_peak(bench) if info.is_main else None)
        # Every rank must name the same run dirs (rank 0's clock decides the out dir).
        out = Path(info.broadcast_object(str(out)))
        # Rank 0 prepares missing datasets (multi-node: cache_dir or data.dir on a shared
        # filesystem); the others wait.
        if info.is_main:
            ensure_data(bench, [c.seq_len for c in cells])
        barrier()
        common = {"git_sha": git_sha(), "device": peak["device"], "bench": bench.name}
        common |= {"peak_tflops": peak["tflops"], "peak_source": peak["source"]}
        rows = []
        for i, cell in enumerate(cells):
            reason = skip_reason(cell, peak["type"])
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if reason:
                result = {"status": "skipped", "reason": reason}
            else:
                run_dir = out / "cells" / f"{i:03d}-{cell.id}-w{info.world_size}"
                result = _run_or_fail(cell, bench, run_dir, peak)
            result.setdefault("world_size", info.world_size)
            rows.append(_row(cell, bench, {**common, "timestamp": stamp}, result))
            if info.is_main:
                print(f"megalite-bench: {_summary(rows[-1])}", flush=True)
        return rows
    finally:
        if info.owns_group:
            shutdown()


def _run_or_fail(cell: Cell, bench: BenchConfig, run_dir: Path, peak: dict) -> dict:
    """run_cell, with an unexpected error recorded as the cell's failure (the grid goes on)."""
    try:
        return run_cell(cell, bench, data_dir_for(bench, cell.seq_len), run_dir, peak)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return {"status": "failed", "reason": f"{type(e).__name__}: {first}"}


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['label']}: {r['status']} ({r['reason']})"
    return (
        f"{r['label']} x{r['world_size']}: {1e3 * r['step_time_median_s']:.1f} ms/step, "
        f"{r['tokens_per_s_per_device']:,.0f} tok/s/dev, MFU {100 * r['mfu']:.1f}%, HFU "
        f"{100 * r['hfu']:.1f}%, {r['peak_mem_gb']:.2f} GB"
    )


def rank_threads(bench: BenchConfig, nproc: int) -> int:
    """CPU threads of each rank of a torchrun job on this machine."""
    return bench.cpu_threads or max(1, (os.cpu_count() or 1) // nproc)


def run_torchrun(cell: Cell, bench: BenchConfig, out: Path, nproc: int, peak: dict) -> dict:
    """One multi-rank cell in its own `torchrun --standalone` job; returns rank 0's row."""
    result_path = out / "cells" / f"{cell.id}-w{nproc}-{time.time_ns()}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"bench": asdict(bench), "cell": asdict(cell), "out": str(out), "peak": peak}
    spec["result"] = str(result_path)
    env = dict(os.environ, MEGALITE_BENCH_WORKER=json.dumps(spec))
    if peak["type"] == "cpu":
        env["OMP_NUM_THREADS"] = str(rank_threads(bench, nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "megalite.bench"]
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=bench.cell_timeout_s
        )
    except subprocess.TimeoutExpired:
        reason = f"timed out after cell_timeout_s={bench.cell_timeout_s}"
        return {"status": "failed", "reason": reason, "world_size": nproc}
    if res.returncode != 0 or not result_path.is_file():
        reason = f"torchrun exit {res.returncode}: {_worker_error(res.stderr)}"
        return {"status": "failed", "reason": reason, "world_size": nproc}
    return json.loads(result_path.read_text())


def _worker_error(stderr: str) -> str:
    """The last exception a rank printed ("[rank0]: ValueError: ..."), else the last line."""
    pattern = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+)(?:Error|Exception|Exit)\b.*)$")
    errors = [m.group(1) for ln in stderr.splitlines() if (m := pattern.match(ln.strip()))]
    errors = [e for e in errors if "ChildFailedError" not in e]
    if errors:
        return errors[-1]
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def worker() -> None:
    """A rank of the torchrun job of one multi-rank cell (run_torchrun)."""
    spec = json.loads(os.environ["MEGALITE_BENCH_WORKER"])
    from omegaconf import OmegaConf

    bench = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), spec["bench"]))
    cell = Cell(**spec["cell"])
    rows = run_launched(bench, [cell], Path(spec["out"]), spec["peak"])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps(rows[0]))


def run_driver(bench: BenchConfig, cells: list[Cell], out: Path) -> list[dict]:
    """Started plainly: one-rank cells in this process, multi-rank cells under torchrun."""
    threads = torch.get_num_threads()
    if bench.cpu_threads:
        torch.set_num_threads(bench.cpu_threads)
    try:
        return _drive(bench, cells, out)
    finally:
        torch.set_num_threads(threads)


def _drive(bench: BenchConfig, cells: list[Cell], out: Path) -> list[dict]:
    peak = _resolve_peak(bench)
    if peak["type"] == "cuda":
        nproc = bench.nproc or torch.cuda.device_count()
    else:
        nproc = bench.nproc or 2
    ensure_data(bench, [c.seq_len for c in cells])
    common = {"git_sha": git_sha(), "device": peak["device"], "bench": bench.name}
    print(
        f"megalite-bench: {bench.name}, {len(cells)} cells on {peak['device']} (multi-rank cells: "
        f"{nproc} ranks), peak {peak['tflops']:.4g} TFLOP/s ({peak['source']}) -> {out}",
        flush=True,
    )
    rows = []
    for i, cell in enumerate(cells):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        cell_peak = dict(peak)
        if cell.multi_rank and peak["type"] == "cpu":
            # The ranks share this CPU: the GEMM peak scales with each rank's share of threads.
            cell_peak["tflops"] *= rank_threads(bench, nproc) / torch.get_num_threads()
        world = nproc if cell.multi_rank else 1
        if reason := skip_reason(cell, peak["type"]):
            result = {"status": "skipped", "reason": reason, "world_size": world}
        elif world > 1:
            result = run_torchrun(cell, bench, out, nproc, cell_peak)
            result.pop("timestamp", None)
        else:
            run_dir = out / "cells" / f"{i:03d}-{cell.id}-w1"
            result = _run_or_fail(cell, bench, run_dir, cell_peak)
            result.setdefault("world_size", 1)
        row = _row(cell, bench, {**common, "timestamp": stamp}, result)
        row["peak_tflops"], row["peak_source"] = cell_peak["tflops"], cell_peak["source"]
        rows.append(row)
        print(f"megalite-bench: {_summary(row)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    if "MEGALITE_BENCH_WORKER" in os.environ:
        worker()
        return 0
    p = cli_args.bench()
    args = p.parse_args(argv)
    try:
        bench = compose_bench(args.config, args.overrides)
    except MegaliteError as e:
        return cli_error("megalite-bench", e)
    cells = expand(bench.grid)
    if args.dry_run:
        device = "cuda" if bench.device != "cpu" and torch.cuda.is_available() else "cpu"
        for cell in cells:
            reason = skip_reason(cell, device)
            print(f"{cell.label()}" + (f"  [skipped: {reason}]" if reason else ""))
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(bench.out_dir or f"benchmarks/results/bench-{bench.name}-{stamp}")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:
        rows = run_launched(bench, cells, out, None)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        rows = run_driver(bench, cells, out)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, out)
    print(markdown_table(rows))
    print(f"megalite-bench: wrote {out}/results.csv, results.md, results.png")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
