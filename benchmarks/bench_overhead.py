"""Framework overhead: megalite's `Trainer.train_step` against a bare PyTorch loop with the same
model, the same weights, the same batches and the same AdamW settings, on this machine.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 5] [--steps 8] [--models debug,tiny]

The bare loop is what a hand-written loop does per step: forward (under bf16 autocast with
--precision bf16), backward, clip_grad_norm_, AdamW step, zero_grad, loss.item(). megalite's step
adds its bookkeeping: the streaming data loader (the bare loop cycles batches already in memory),
the lr schedule, the packed loss / stop-flag all-reduce (a no-op at world size 1) read back in
one device-to-host copy, and the loss guard. (The data fingerprint runs only under
MEGALITE_DEBUG=fingerprint.)

Both run in one process, interleaved round by round with the order alternating, so load from
other work on the machine falls on both alike. Each round times `--steps` steps of each after
its warm-up; the ratio is median(megalite step) / median(bare step) over every timed step, and
ratio_p20 / ratio_p80 spread the per-round ratios. One CPU thread by default (--threads): with
two threads on a shared 2-core machine, OpenMP spin-waiting made both loops 10x slower and
erratic. Rows go to
benchmarks/results/overhead-<timestamp>.csv with the git SHA, device and timestamp.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from megalite.kernels import _bench

from megalite.bench import percentile
from megalite.bench_grid import BenchConfig, ensure_data
from megalite.bench_report import git_sha
from megalite.compose import compose_config
from megalite.metrics import device_name
from megalite.model.transformer import build_model
from megalite.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
SEQ_LEN = 128
# Model variants (megalite-train overrides). `tiny` has steps short enough that per-step
# bookkeeping shows; `debug` is the demo model.
MODELS = {
    "debug": ["model=debug"],
    "tiny": ["model=debug", "model.dim=64", "model.n_layers=2", "model.ffn_dim=192"],
}


def data_dir() -> Path:
    """The demo dataset if `make demo` prepared it, else Shakespeare prepared once into
    benchmarks/results/data (the same cache megalite-bench uses)."""
    demo = REPO / "data" / "shakespeare"
    if (demo / "manifest.json").is_file():
        return demo
    bench = BenchConfig()
    bench.data.cache_dir = str(OUT / "data")
    return ensure_data(bench, [SEQ_LEN])[SEQ_LEN]


def build(model: str, micro_batch: int, run_dir: Path, precision: str):
    cfg = compose_config(
        [
            *MODELS[model],
            "parallel=single",
            f"data.dir={data_dir()}",
            f"data.seq_len={SEQ_LEN}",
            f"train.micro_batch_size={micro_batch}",
            "train.max_steps=100000",
            f"train.precision={precision}",
            "train.device=cpu",
            f"train.run_dir={run_dir}",
            "logging.console=false",
            "logging.jsonl=false",
        ]
    )
    trainer = Trainer(cfg)
    # Same weights (both initialized from train.seed), same optimizer settings.
    model_ = build_model(cfg.model, seed=cfg.train.seed)
    opt = torch.optim.AdamW(
        model_.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    # The bare loop cycles through batches of the same stream, already in memory.
    batches = [next(trainer.stream) for _ in range(4)]
    clip = cfg.optim.grad_clip

    def bare_step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        x, y = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model_(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return trainer, bare_step, batches, sum(p.numel() for p in model_.parameters())


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def measure(
    model: str, micro_batch: int, rounds: int, steps: int, warmup: int, precision: str
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, bare_step, batches, n_params = build(
            model, micro_batch, Path(tmp) / "run", precision
        )
        cycle = itertools.cycle(batches)
        try:
            runners = {
                "megalite": lambda: trainer.train_step(),
                "bare": lambda: bare_step(next(cycle)),
            }
            for run in runners.values():
                time_steps(run, warmup)
            per_step = {"megalite": [], "bare": []}
            round_ratios = []
            for r in range(rounds):
                order = ["megalite", "bare"] if r % 2 == 0 else ["bare", "megalite"]
                medians = {}
                for name in order:
                    times = time_steps(runners[name], steps)
                    per_step[name] += times
                    medians[name] = statistics.median(times)
                round_ratios.append(medians["megalite"] / medians["bare"])
        finally:
            trainer.close()
    mega, bare = statistics.median(per_step["megalite"]), statistics.median(per_step["bare"])
    return {
        "model": model,
        "n_params": n_params,
        "micro_batch": micro_batch,
        "seq_len": SEQ_LEN,
        "precision": precision,
        "rounds": rounds,
        "steps_per_round": steps,
        "megalite_median_ms": 1e3 * mega,
        "bare_median_ms": 1e3 * bare,
        "overhead_ms": 1e3 * (mega - bare),
        "ratio": mega / bare,
        "ratio_p20": percentile(round_ratios, 20),
        "ratio_p80": percentile(round_ratios, 80),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="fp32 by default: on CPUs without native bf16 a bf16 step is ~50x slower and the "
        "overhead disappears in it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One by default: on a shared 2-core machine "
        "OpenMP threads spin-wait against other work and step times swing 10x",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"--models: {name!r} is not one of {', '.join(MODELS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {
        "git_sha": git_sha(),
        "device": device_name(torch.device("cpu")),  # names the thread count
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = []
    for name in args.models.split(","):
        row = {
            **common,
            **measure(name, args.micro_batch, args.rounds, args.steps, args.warmup, args.precision),
        }
        rows.append(row)
        print(
            f"{name:6s} {row['n_params'] / 1e6:5.2f}M params  "
            f"megalite {row['megalite_median_ms']:7.1f} "
            f"ms  bare {row['bare_median_ms']:7.1f} ms  ratio {row['ratio']:.3f} "
            f"(rounds p20-p80 {row['ratio_p20']:.3f}-{row['ratio_p80']:.3f})  "
            f"overhead {row['overhead_ms']:+.1f} ms/step",
            flush=True,
        )
    _bench.write_csv(OUT / f"overhead-{stamp}.csv", rows)


if __name__ == "__main__":
    main()
