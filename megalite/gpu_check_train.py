"""`megalite-gpu-check`, parts (b) to (d): training on a world-size-1 process group, torch.compile
recompiles, and throughput, each through megalite's own `Trainer` (megalite/gpu_check.py says
what each checks and when a row passes).

The process group is started here, in this process, before any Trainer: `init_distributed` then
finds it initialized and every collective of the trainer, of DDP, FSDP2 and DeepSpeed runs on it;
the group's sequence number counts them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    perf_micro=1,
    perf_warmup=0,
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


# ------------------------------------------------------------------------- process group
def start_group(device: torch.device) -> str:
    """A process group of world size 1 (nccl on CUDA, gloo on a CPU) in an in-process store:
    the trainer finds it initialized and runs every collective on it."""
    import torch.distributed as dist

    # What a launcher would set: DeepSpeed's engine refuses to start without LOCAL_RANK.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )
    return backend


class Collectives:
    """Counts the collectives issued on the default process group (the one start_group made)
    inside a block, by the group's own sequence number: each collective the trainer, DDP, FSDP
    or DeepSpeed runs on it advances it by one, whatever called it."""

    def __enter__(self) -> Collectives:
        import torch.distributed as dist

        self._group = dist.group.WORLD
        self._start = self._group._get_sequence_number_for_group()
        self.count = 0
        return self

    def __exit__(self, *exc) -> None:
        self.count = self._group._get_sequence_number_for_group() - self._start


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
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
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
    from megalite.compose import compose_config
    from megalite.trainer import Trainer

    name = layout + ("_compile" if extra else "")
    cfg = compose_config(train_overrides(ctx, layout, fresh_dir(ctx.out / "runs" / name)) + extra)
    trainer = Trainer(cfg)
    try:
        losses = []
        with Collectives() as collectives:
            for step in range(1, STEPS + 1):
                losses.append(float(trainer.train_step().loss))
                if on_step is not None:
                    on_step(step)
        val_loss = trainer.evaluate()
        precision = trainer.cfg.train.precision
    finally:
        trainer.close()
    return {
        "losses": losses,
        "collectives": collectives.count,
        "val": val_loss,
        "precision": precision,
    }


def check_training(ctx: Context) -> list[dict]:
    # DeepSpeed still calls the deprecated c10d names, once per parameter per step.
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor. is deprecated")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")
    rows = []
    for layout in LAYOUTS:
        row = {"section": "train", "check": f"train {layout}", "layout": layout, "steps": STEPS}
        try:
            if layout == "zero3" and (why := deepspeed_missing(ctx.device)):
                rows.append({**row, "status": "skip", "reason": why})
                continue
            result = run_training(ctx, layout, [])
        except Exception as e:  # one layout's failure is its row; the others still run
            rows.append({**row, "status": "fail", "reason": error(e)})
            continue
        losses, ran = result["losses"], result["collectives"]
        finite, falling, reason = loss_verdict(losses)
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
                "status": "pass" if finite and falling and ran else "fail",
                "reason": reason,
            }
        )
    return rows


def error(e: BaseException) -> str:
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
        return [{**row, "status": "fail", "reason": error(e)}]
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
            "reason": reason or "; ".join(f"eval {r}" for r in rec.reasons[after_first[-1] :][:2]),
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
    from megalite.bench import run_cell
    from megalite.bench_grid import BenchConfig, Cell
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
        if settings["compile"]:
            # Graphs cached for other shapes would make dynamo mark dims dynamic on the first
            # recompile (automatic dynamic shapes): measure the static-shape graphs a run gets.
            torch._dynamo.reset()
        try:
            with compile_backend("aot_eager" if ctx.smoke else None):
                r = run_cell(cell, bench, ctx.data[p.perf_seq], run_dir, peak_info)
        except Exception as e:
            rows.append({**row, "status": "fail", "reason": error(e)})
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
