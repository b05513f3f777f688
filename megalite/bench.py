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

A grid entry of `model` or `parallel` is a preset name optionally followed by overrides, e.g.
`"fsdp_tp parallel.tp=2"`. Cells whose backend cannot run here (Triton kernels and flash-attn on
a CPU, a missing package) or whose config is invalid are reported as skipped, with the reason.

Outputs, in `out_dir`: results.csv (one row per cell with git SHA, device, world size, timestamp,
every setting, median / p20 / p80 step time, tokens/s and TFLOP/s per device, MFU, HFU, peak and
planned memory), results.md (the same as a table) and results.png.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from megalite.bench_report import git_sha, markdown_table, write_outputs
from megalite.config import ConfigError
from megalite.devices import PRECISIONS, resolve_precision
from megalite.metrics import AC_MODES

ATTENTION = ("auto", "sdpa", "triton", "flash_attn")
NORM = ("auto", "torch", "triton")
LOSS = ("auto", "torch", "triton", "fused_linear")


# ------------------------------------------------------------------------------- config
@dataclass
class GridConfig:
    """The axes; the grid is their product, in this order."""

    model: list[str] = field(default_factory=lambda: ["debug"])
    parallel: list[str] = field(default_factory=lambda: ["single"])
    seq_len: list[int] = field(default_factory=lambda: [128])
    micro_batch: list[int] = field(default_factory=lambda: [8])
    attention: list[str] = field(default_factory=lambda: ["sdpa"])
    norm: list[str] = field(default_factory=lambda: ["torch"])
    loss: list[str] = field(default_factory=lambda: ["torch"])
    compile: list[bool] = field(default_factory=lambda: [False])
    activation_checkpointing: list[str] = field(default_factory=lambda: ["none"])


@dataclass
class BenchDataConfig:
    # A prepared dataset for every cell; "{seq_len}" in it is replaced by the cell's seq len.
    # None: prepare `inputs` at each seq len into cache_dir (once; later runs reuse it).
    dir: str | None = None
    inputs: list[str] = field(default_factory=lambda: ["shakespeare"])
    vocab_size: int = 4096
    cache_dir: str = "benchmarks/results/data"


@dataclass
class BenchConfig:
    name: str = "bench"
    grid: GridConfig = field(default_factory=GridConfig)
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    warmup_steps: int = 3
    measure_steps: int = 10
    # auto: bf16 on GPUs and CPUs with native bf16, else fp32 (megalite.devices.resolve_precision)
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # Ranks of the torchrun job of each multi-rank cell when started plainly; None: the GPU
    # count, or 2 on a CPU.
    nproc: int | None = None
    # CPU threads per process (torch.set_num_threads / OMP_NUM_THREADS); None: torch's default
    # in the driver and the cores split evenly between the ranks of a torchrun job. On a shared
    # machine fewer threads than cores avoid OpenMP spin-waiting against other work.
    cpu_threads: int | None = None
    cell_timeout_s: int = 1800
    # Dense bf16 peak per device; None: the table for known GPUs, else one GEMM probe.
    peak_tflops: float | None = None
    # megalite-train overrides for every cell (e.g. optim.lr=1e-4, a data mixture, ...).
    overrides: list[str] = field(default_factory=list)
    # None: benchmarks/results/bench-<name>-<timestamp>.
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.measure_steps < 1:
            raise ConfigError(f"measure_steps={self.measure_steps} must be >= 1")
        for key in ("nproc", "cpu_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1 (or null for auto)")
        for key, choices in (("precision", PRECISIONS), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {choices}")
        for key, choices in (
            ("attention", ATTENTION),
            ("norm", NORM),
            ("loss", LOSS),
            ("activation_checkpointing", AC_MODES),
        ):
            for value in getattr(self.grid, key):
                if value not in choices:
                    raise ConfigError(
                        f"grid.{key} has {value!r}, not one of {', '.join(choices)}; fix the list"
                    )
        for key in ("model", "parallel", "seq_len", "micro_batch", "attention", "compile"):
            if not getattr(self.grid, key):
                raise ConfigError(f"grid.{key} is empty; give at least one value")


ConfigStore.instance().store(name="base_bench", node=BenchConfig)


def bench_conf_dir() -> Path:
    from megalite.train import CONF_DIR

    return Path(CONF_DIR) / "bench"


def compose_bench(name: str, overrides: list[str]) -> BenchConfig:
    """The typed BenchConfig of conf/bench/<name>.yaml with Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = bench_conf_dir()
    if not (conf_dir / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in conf_dir.glob("*.yaml")))
        raise ConfigError(f"--config={name!r} is not in {conf_dir}; pick one of {known}")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return OmegaConf.to_object(compose(name, overrides=overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    except HydraException as e:  # a bad override: Hydra's message, then OmegaConf's reason
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise ConfigError(str(e).splitlines()[0].rstrip(".") + cause) from e


# -------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    model: str
    parallel: str
    seq_len: int
    micro_batch: int
    attention: str
    norm: str
    loss: str
    compile: bool
    activation_checkpointing: str

    @property
    def id(self) -> str:
        # Safe in a path and in a Hydra override value (no '=', spaces or quotes).
        text = "-".join(str(v) for v in asdict(self).values())
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)

    @property
    def multi_rank(self) -> bool:
        return self.parallel.split()[0] != "single"

    def label(self) -> str:
        model, parallel = self.model.split()[0], self.parallel.replace(" parallel.", " ")
        extra = [self.attention, self.norm, self.loss]
        extra += ["compile"] if self.compile else []
        if self.activation_checkpointing != "none":
            extra.append(f"ac={self.activation_checkpointing}")
        return f"{model} {parallel} s{self.seq_len} b{self.micro_batch} {'/'.join(extra)}"

    def overrides(self, bench: BenchConfig, data_dir: Path, run_dir: Path) -> list[str]:
        model, *model_extra = self.model.split()
        parallel, *parallel_extra = self.parallel.split()
        steps = bench.warmup_steps + bench.measure_steps
        return [
            f"model={model}",
            f"parallel={parallel}",
            *model_extra,
            *parallel_extra,
            f"model.attention={self.attention}",
            f"model.norm={self.norm}",
            f"train.loss={self.loss}",
            f"train.compile={str(self.compile).lower()}",
            f"parallel.activation_checkpointing={self.activation_checkpointing}",
            f"data.dir={data_dir}",
            f"data.seq_len={self.seq_len}",
            f"train.micro_batch_size={self.micro_batch}",
            "train.grad_accum_steps=1",
            f"train.precision={bench.precision}",
            f"train.device={bench.device}",
            f"train.max_steps={steps}",
            f"train.run_dir={run_dir}",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.plot=false",
            "logging.console=false",
            "logging.jsonl=false",
            "logging.wandb.mode=disabled",
            *bench.overrides,
        ]


def expand(grid: GridConfig) -> list[Cell]:
    axes = [
        grid.model,
        grid.parallel,
        grid.seq_len,
        grid.micro_batch,
        grid.attention,
        grid.norm,
        grid.loss,
        grid.compile,
        grid.activation_checkpointing,
    ]
    return [Cell(*values) for values in itertools.product(*axes)]


def skip_reason(cell: Cell, device_type: str) -> str | None:
    """Why a cell cannot run on this device, before trying (kernels that need a GPU)."""
    if device_type == "cuda":
        return None  # a missing package shows up as BackendUnavailableError when building
    for key, value in (
        ("model.attention", cell.attention),
        ("model.norm", cell.norm),
        ("train.loss", cell.loss),
    ):
        if value == "flash_attn":
            return f"{key}={value} needs a CUDA GPU (flash-attn has no CPU build)"
        if value in ("triton", "fused_linear"):
            return (
                f"{key}={value} is a Triton kernel and needs a CUDA GPU (on a CPU Triton runs "
                "only in its interpreter, which checks numerics, not speed)"
            )
    return None


# ---------------------------------------------------------------------------------- data
def data_dir_for(bench: BenchConfig, seq_len: int) -> Path:
    if bench.data.dir is not None:
        return Path(bench.data.dir.replace("{seq_len}", str(seq_len)))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", "-".join(Path(i).name for i in bench.data.inputs))
    return Path(bench.data.cache_dir) / f"{slug[:60]}-v{bench.data.vocab_size}-s{seq_len}"


def ensure_data(bench: BenchConfig, seq_lens: list[int]) -> dict[int, Path]:
    """The dataset of every seq len, prepared if missing (all with the first one's tokenizer)."""
    from megalite.data.prepare import PrepareOptions, prepare

    dirs = {s: data_dir_for(bench, s) for s in sorted(set(seq_lens))}
    if bench.data.dir is not None:
        return dirs
    ready = [d for d in dirs.values() if (d / "manifest.json").is_file()]
    tokenizer = ready[0] / "tokenizer.json" if ready else None
    for seq_len, path in dirs.items():
        if (path / "manifest.json").is_file():
            continue
        print(f"megalite-bench: preparing {bench.data.inputs} at seq_len {seq_len} -> {path}")
        prepare(
            PrepareOptions(
                inputs=list(bench.data.inputs),
                out=str(path),
                seq_len=seq_len,
                vocab_size=bench.data.vocab_size,
                tokenizer=str(tokenizer) if tokenizer else None,
                progress=False,
            )
        )
        tokenizer = tokenizer or path / "tokenizer.json"
    return dirs


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
    from megalite.data.prepare import DataError
    from megalite.metrics import (
        Peak,
        flops_per_token,
        hardware_flops_per_token,
        mfu_warning,
        peak_memory_gb,
        reset_peak_memory,
    )
    from megalite.model.layers import BackendUnavailableError
    from megalite.parallel.distributed import pick_device
    from megalite.plan import estimate_memory, param_count
    from megalite.train import compose_config
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
    except (ConfigError, DataError, BackendUnavailableError) as e:
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
        plan = estimate_memory(resolved, world)
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
    p = argparse.ArgumentParser(
        prog="megalite-bench",
        description="MFU benchmark grid. Trailing KEY=VALUE arguments are Hydra overrides of the "
        "bench config (grid.seq_len=[128,256], measure_steps=20, 'overrides=[\"optim.lr=1e-4\"]').",
    )
    p.add_argument("--config", default="cpu_smoke", help="conf/bench/<name>.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        bench = compose_bench(args.config, args.overrides)
    except ConfigError as e:
        print(f"megalite-bench: error: {e}", file=sys.stderr)
        return 2
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
