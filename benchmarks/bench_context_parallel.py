"""Activation memory per rank under context parallelism (Ulysses), against one process.

    .venv/bin/python benchmarks/bench_context_parallel.py [--seq-len 2048] [--cps 2,4]

For each cp degree, one forward of the same micro-batch (micro x seq_len tokens, fp32) on cp gloo
ranks, the sequence split by megalite.parallel.context; "saved" is the bytes of every tensor
autograd keeps for backward on the busiest rank (unique storages, parameters excluded, via
saved_tensors_hooks) — what context parallelism exists to shrink. cp=1 is the same forward in one
process. The plan (megalite.memory.activation_bytes / cp, without the logits' gradient, which
exists only in backward) is printed beside it. The ratio saved(cp) / saved(1) is the number to
read: 1/cp if the split is clean.
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
from megalite.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"


def model_cfg(seq_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=4096,
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=768,
        max_seq_len=seq_len,
        attention="sdpa",
        norm="torch",
    )


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params.add(model.rope.untyped_storage().data_ptr())
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)


def batch(seq_len: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 4096, (micro, seq_len), generator=gen)


def worker(seq_len: int, micro: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.model.transformer import build_model
    from megalite.parallel.context import apply_cp

    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    model = build_model(model_cfg(seq_len), loss="torch")
    apply_cp(model, mesh, "ulysses")
    start = time.perf_counter()
    nbytes = saved_bytes(model, batch(seq_len, micro))
    seconds = time.perf_counter() - start
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps([nbytes, seconds]))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--cps", default="2,4")
    args = p.parse_args()
    if "MEGALITE_BENCH_WORKER" in os.environ:
        worker(args.seq_len, args.micro, Path(os.environ["MEGALITE_BENCH_WORKER"]))
        return

    from megalite.memory import activation_bytes
    from megalite.model.transformer import build_model

    cfg = model_cfg(args.seq_len)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = OUT / f"context_parallel-{stamp}"
    run.mkdir(parents=True)
    base = saved_bytes(build_model(cfg, loss="torch"), batch(args.seq_len, args.micro))
    plan = activation_bytes(cfg, args.micro * args.seq_len, "fp32", logits_grad=False)
    rows = [(1, base)]
    for cp in (int(c) for c in args.cps.split(",")):
        out = run / f"cp{cp}"
        out.mkdir()
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc_per_node={cp}",
            __file__,
            f"--seq-len={args.seq_len}",
            f"--micro={args.micro}",
        ]
        env = dict(
            os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MEGALITE_BENCH_WORKER=str(out)
        )
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"cp={cp}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        ranks = [json.loads(f.read_text())[0] for f in sorted(out.glob("rank*.json"))]
        rows.append((cp, max(ranks)))
    records = []
    for cp, nbytes in rows:
        records.append(
            {
                "cp": cp,
                "seq_len": args.seq_len,
                "micro": args.micro,
                "saved_mb_per_rank": nbytes / 2**20,
                "ratio_to_cp1": nbytes / base,
                "planned_mb_per_rank": plan / cp / 2**20,
                "measured_over_plan": nbytes / (plan / cp),
                "git_sha": git_sha(),
                "device": "cpu",
                "timestamp": stamp,
            }
        )
        r = records[-1]
        print(
            f"cp={cp}: saved {r['saved_mb_per_rank']:8.1f} MB/rank  x{r['ratio_to_cp1']:.3f} of "
            f"cp=1  (plan {r['planned_mb_per_rank']:8.1f} MB, measured/plan "
            f"{r['measured_over_plan']:.2f})",
            flush=True,
        )
    _bench.write_csv(OUT / f"context_parallel-{stamp}.csv", records)


if __name__ == "__main__":
    main()
