"""How long a checkpoint save stalls the training loop: synchronous (train.ckpt_async=none)
against asynchronous (thread), on a model of at least 100M parameters, in one run.

    python benchmarks/bench_async_checkpoint.py [--saves 3] [--dim 768 --layers 12]
        [--out benchmarks/results/async_checkpoint.csv]

The stall of a save is the time the training loop spends blocked by it:
- sync: the whole `checkpoint.save` (DCP write of model + AdamW state, fsync, commit);
- async: `AsyncSaver.save` (trainer-state file, plan, submitting the staging copy), plus the wait
  for the staging copy at the next optimizer step, plus any wait for the previous save at the
  next one (0 when it finished in time).
Each save follows a few training steps (so AdamW's state exists, and an async save has steps to
overlap with); the medians over `--saves` saves are compared. Also reported: the mean step time
while an async save is being written against steps with none in flight, since on a CPU the
writer shares the cores with training (on a GPU it does not compete with the kernels).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from megalite.kernels import _bench

from megalite import checkpoint
from megalite.checkpoint_async import AsyncSaver
from megalite.config import ModelConfig, OptimConfig
from megalite.model.transformer import Transformer, count_params
from megalite.optim import build_optimizer
from megalite.parallel.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchEngine:
    """The engine interface checkpoint.save and AsyncSaver use (NativeEngine's, one process)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    checkpoint_format: str = "dcp"

    def save(self, directory: Path) -> None:
        checkpoint.save_dcp(self.model, self.optimizer, directory)


def step(engine: BenchEngine, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = engine.model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=3)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=64, help="tokens per step (batch 1)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/async_checkpoint.csv"))
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.dim // 64,
        max_seq_len=args.tokens + 1,
        attention="sdpa",
        norm="torch",
    )
    model = Transformer(cfg, loss="torch")
    model.init_weights(seed=0)
    n_params = count_params(model)
    engine = BenchEngine(model, build_optimizer(model, OptimConfig(lr=1e-4)))
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    batch = torch.randint(0, args.vocab, (1, args.tokens + 1))
    state_gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 1e9
    print(f"model {n_params / 1e6:.1f}M params; checkpoint ~{state_gb:.2f} GB (weights + AdamW)")
    for _ in range(2):  # AdamW's state exists from the first step on
        step(engine, batch)

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-async-ckpt-"))
    stalls: dict[str, list[float]] = {"sync": [], "thread": []}
    quiet_steps: list[float] = []
    busy_steps: list[float] = []
    saved = 0

    # ---- synchronous saves
    run = root / "sync"
    for _ in range(args.saves):
        quiet_steps += [step(engine, batch) for _ in range(args.steps_between)]
        saved += 1
        t0 = time.perf_counter()
        checkpoint.save(run, saved, engine, {"step": saved}, cfg, dist_info, keep_last=1)
        stalls["sync"].append(time.perf_counter() - t0)
        print(f"sync save {saved}: stall {stalls['sync'][-1]:.3f} s")

    # ---- asynchronous saves (thread)
    run = root / "thread"
    saver = AsyncSaver("thread", engine, dist_info, timeout_s=600)
    staging_wait = [0.0]
    wait_for_staging = saver.wait_for_staging

    def timed_staging_wait() -> None:  # the optimizer pre-hook calls this
        t0 = time.perf_counter()
        wait_for_staging()
        staging_wait[0] += time.perf_counter() - t0

    saver.wait_for_staging = timed_staging_wait
    for _ in range(args.saves):
        saved += 1
        t0 = time.perf_counter()
        saver.wait()  # the previous save, if still in flight: part of this save's stall
        blocked_prev = time.perf_counter() - t0
        t0 = time.perf_counter()
        saver.save(run, saved, {"step": saved}, cfg, keep_last=1)
        call = time.perf_counter() - t0
        staging_wait[0] = 0.0
        for _ in range(args.steps_between):
            (busy_steps if saver.writing else quiet_steps).append(step(engine, batch))
        stalls["thread"].append(blocked_prev + call + staging_wait[0])
        print(
            f"async save {saved}: stall {stalls['thread'][-1]:.3f} s (previous save "
            f"{blocked_prev:.3f}, save call {call:.3f}, staging wait {staging_wait[0]:.3f})"
        )
    t0 = time.perf_counter()
    saver.close()
    final_wait = time.perf_counter() - t0
    assert (run / "checkpoints" / f"step_{saved:08d}" / "meta.json").is_file()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    sync_s, async_s = statistics.median(stalls["sync"]), statistics.median(stalls["thread"])
    quiet = statistics.mean(quiet_steps)
    busy = statistics.mean(busy_steps) if busy_steps else float("nan")
    print(
        f"median stall per save: sync {sync_s:.3f} s, async {async_s:.3f} s, "
        f"ratio {async_s / sync_s:.4f} (bar: <= 0.1)\n"
        f"step time: {quiet:.3f} s with no save in flight, {busy:.3f} s while one is written "
        f"({len(busy_steps)} steps); the last async save finished {final_wait:.2f} s after "
        "training stopped"
    )
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    row = {
        "params_m": round(n_params / 1e6, 1),
        "checkpoint_gb": round(state_gb, 2),
        "saves": args.saves,
        "sync_stall_s": round(sync_s, 4),
        "async_stall_s": round(async_s, 4),
        "ratio": round(async_s / sync_s, 4),
        "step_s_quiet": round(quiet, 3),
        "step_s_during_write": round(busy, 3),
        "device": f"cpu x{torch.get_num_threads()} threads",
        "git_sha": sha,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _bench.write_csv(Path(args.out), [row])


if __name__ == "__main__":
    main()
