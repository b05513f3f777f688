"""Per-rank peak memory of every parallel strategy at 4 ranks, against the theory.

    .venv/bin/python benchmarks/bench_parallel_memory.py [--ranks 4] [--steps 3]

Theory per rank, fp32 training with AdamW (4 bytes each for parameter, gradient, exp_avg,
exp_avg_sq; P = parameter count, A = activation bytes of one micro-batch):

    ddp       16 P                      + A
    fsdp      16 P / 4                  + A
    hsdp      16 P / 2   (2 x 2 mesh)   + A
    tp        16 P / 4                  + A / 4   (sequence parallel shards activations too)
    fsdp_tp   16 P / 4   (2 x 2 mesh)   + A / 2
    zero1      8 P + 8 P / 4            + A
    zero2      4 P + 12 P / 4           + A
    zero3     16 P / 4                  + A

A is measured, not guessed: the bytes of every tensor autograd saves in one forward of the same
micro-batch (unique storages, via saved_tensors_hooks), in one process. "Measured" is the peak of
live tensor memory on the busiest rank during one full training step (after a warm-up step that
allocates the optimizer state), from torch's MemTracker (torch.distributed._tools), which counts
what the theory leaves out too: unsharded parameters while FSDP computes a block, gradient and
communication buffers, temporaries. CPU RSS would mostly measure the Python runtime instead.
The ratio measured / theory is the number to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from megalite.kernels import _bench

from megalite.bench_report import git_sha

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
MODEL = [
    "model.vocab_size=4096",
    "model.dim=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_dim=1536",
    "model.max_seq_len=128",
]
# strategy: (overrides, state bytes per parameter on one rank, activation divisor)
STRATEGIES = {
    "ddp": (["parallel=ddp"], 16, 1),
    "fsdp": (["parallel=fsdp"], 16 / 4, 1),
    "hsdp": (["parallel=hsdp", "parallel.dp_shard=2"], 16 / 2, 1),
    "tp": (["parallel=tp"], 16 / 4, 4),
    "fsdp_tp": (["parallel=fsdp_tp", "parallel.tp=2"], 16 / 4, 2),
    "zero1": (["parallel=zero1"], 8 + 8 / 4, 1),
    "zero2": (["parallel=zero2"], 4 + 12 / 4, 1),
    "zero3": (["parallel=zero3"], 16 / 4, 1),
}
MICRO = 4  # sequences per data-parallel rank per micro-batch


def overrides(data: Path, run: Path, extra: list[str], steps: int) -> list[str]:
    # Tensor-parallel ranks share their group's micro-batch of MICRO sequences.
    return [
        *MODEL,
        *extra,
        f"data.dir={data}",
        "data.seq_len=128",
        f"train.run_dir={run}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={MICRO}",
        "train.precision=fp32",
        "train.eval_every=0",
        "train.eval_batches=0",
        "train.ckpt_every=0",
        "train.plot=false",
        "train.log_every=1000",
        "logging.console=false",
        "logging.peak_tflops=1",
    ]


def worker(strategy: str, data: Path, run: Path, steps: int) -> None:
    """One strategy under torchrun: build, warm up (the optimizer allocates its state on the
    first step), then track one full step's tensor memory on this rank."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from megalite.compose import compose_config
    from megalite.trainer import Trainer

    extra, _, _ = STRATEGIES[strategy]
    trainer = Trainer(compose_config(overrides(data, run, extra, steps)))
    for _ in range(max(1, steps - 1)):
        trainer.train_step()
    tracker = MemTracker()
    optimizer = trainer.engine.optimizer
    # DeepSpeed wraps the torch optimizer; the tracker needs the torch one.
    base_opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer
    tracker.track_external(trainer.engine.model, base_opt)
    with tracker:
        trainer.train_step()
    peak = tracker.get_tracker_snapshot("peak")[trainer.device]
    rank = int(os.environ.get("RANK", "0"))
    (run / f"mem_rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "peak": peak["Total"],
                "by_kind": {str(k).split(".")[-1]: v for k, v in peak.items() if k != "Total"},
                "params": trainer.n_params,
            }
        )
    )
    trainer.close()


def activation_bytes(data: Path) -> int:
    """Bytes autograd saves in one forward of a MICRO x 128 micro-batch (fp32)."""
    from megalite.compose import compose_config
    from megalite.model.transformer import build_model

    cfg = compose_config(overrides(data, OUT / "unused", [], 1))
    model = build_model(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (MICRO, 128))
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device.index or 0)
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


def ensure_data() -> Path:
    data = REPO / "data" / "shakespeare"
    if (data / "manifest.json").is_file():
        return data
    data = OUT / "shakespeare"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "megalite.data.cli",
                "prepare",
                "shakespeare",
                "--out",
                str(data),
                "--seq-len",
                "128",
                "--vocab-size",
                "4096",
            ],
            check=True,
        )
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="warm-up steps + 1 tracked step")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args()
    if "MEGALITE_BENCH_WORKER" in os.environ:
        # Settings come by environment: torchrun would take option-like words for its own.
        spec = json.loads(os.environ["MEGALITE_BENCH_WORKER"])
        worker(spec["strategy"], Path(spec["data"]), Path(spec["run"]), spec["steps"])
        return

    OUT.mkdir(parents=True, exist_ok=True)
    data = ensure_data()
    act = activation_bytes(data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for name in args.strategies.split(","):
        _, state_factor, act_div = STRATEGIES[name]
        run = OUT / f"mem-{stamp}" / name
        run.mkdir(parents=True)
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc_per_node={args.ranks}",
            __file__,
        ]
        spec = {"strategy": name, "data": str(data), "run": str(run), "steps": args.steps}
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            MEGALITE_BENCH_WORKER=json.dumps(spec),
        )
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        ranks = [json.loads(f.read_text()) for f in sorted(run.glob("mem_rank*.json"))]
        params = ranks[0]["params"]
        busiest = max(ranks, key=lambda r: r["peak"])
        measured = busiest["peak"]
        theory = state_factor * params + act / act_div
        rows.append(
            {
                "strategy": name,
                "ranks": args.ranks,
                "params": params,
                "state_bytes_per_param": state_factor,
                "activation_mb": act / 2**20 / act_div,
                "theory_mb": theory / 2**20,
                "measured_peak_mb": measured / 2**20,
                "ratio": measured / theory,
                **{f"peak_{k.lower()}_mb": v / 2**20 for k, v in busiest["by_kind"].items()},
                "git_sha": git_sha(),
                "device": "cpu",
                "timestamp": stamp,
            }
        )
        r = rows[-1]
        print(
            f"{name:8s} theory {r['theory_mb']:8.1f} MB  "
            f"measured {r['measured_peak_mb']:8.1f} MB  ratio {r['ratio']:.2f}",
            flush=True,
        )
    _bench.write_csv(OUT / f"parallel_memory-{stamp}.csv", rows)


if __name__ == "__main__":
    main()
