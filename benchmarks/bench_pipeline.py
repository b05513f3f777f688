"""Pipeline parallelism on one tiny model: per-stage peak memory against megalite-plan's estimate,
and the step time of every schedule side by side.

    .venv/bin/python benchmarks/bench_pipeline.py [--pp 2,4] [--steps 6]

For each pipeline degree and schedule, one torchrun job of `pp` ranks trains the same model
(8 layers, dim 256, fp32, micro-batch 8 x 128 tokens split into 4 pipeline micro-batches) with
the real Trainer: warm-up steps, then `--steps` timed `Trainer.train_step` calls (median), then
one step under a tensor-memory tracker (`LiveTensorBytes`: a dispatch mode that follows every
storage's lifetime, like torch's MemTracker), which records the peak of live tensor memory on
each rank (parameters, gradients, optimizer state, activations, temporaries and the pipeline's
receive buffers; not the Python runtime).

Read two ratios:
- memory: measured peak / `memory.pipeline_memory` of that pipeline rank (the planner's
  per-stage estimate; parameters + gradients + AdamW + activations in flight).
- time: each schedule's median step time / 1F1B's at the same pp, next to the bubble each
  schedule's formula predicts (pp_split.bubble_fraction). On a CPU box with fewer cores than
  ranks the ranks also compete for cores, so the ratios, not the times, are the result.

Rows go to benchmarks/results/pipeline-<stamp>.csv with the git SHA, device and timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
MODEL = [
    "model.vocab_size=4096",
    "model.dim=256",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_dim=768",
    "model.max_seq_len=128",
]
SCHEDULES = {  # 1F1B first: the others' step times are given relative to it
    "1f1b": ["parallel.pp_schedule=1f1b"],
    "gpipe": ["parallel.pp_schedule=gpipe"],
    "interleaved_1f1b": ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    "zbv": ["parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
}
MICRO, CHUNKS = 8, 4


def overrides(data: Path, run: Path, pp: int, schedule: str, steps: int) -> list[str]:
    return [
        *MODEL,
        "parallel=pp",
        f"parallel.pp={pp}",
        f"parallel.pp_microbatches={CHUNKS}",
        *SCHEDULES[schedule],
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


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages on one device: the ones registered with `track` (the
    model, the optimizer state) and every storage an op creates while the mode is active, each
    counted until it is freed (a weak reference per storage, as torch's MemTracker keeps).
    torch's MemTracker itself cannot be used here: its module hooks refuse a module called
    once per pipeline micro-batch, and break ZB-V's input-only backward (autograd.grad)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.live, self.current, self.peak = device, {}, 0, 0
        self._refs: list[weakref.ref] = []

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if isinstance(t, DTensor):
            t = t.to_local()
        if not isinstance(t, torch.Tensor) or t.device != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(st, lambda _, key=key: self._free(key)))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


def worker(spec: dict) -> None:
    """One (pp, schedule) under torchrun: warm up, time steps, then track one step's memory."""
    import torch

    from megalite.compose import compose_config
    from megalite.memory import pipeline_memory
    from megalite.trainer import Trainer

    run = Path(spec["run"])
    cfg = compose_config(overrides(Path(spec["data"]), run, spec["pp"], spec["schedule"], 100))
    trainer = Trainer(cfg)
    for _ in range(2):  # the optimizer allocates its state; the schedule infers the shapes
        trainer.train_step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        trainer.train_step()  # ends with the step's all-reduce: every rank finished
        times.append(time.perf_counter() - t0)

    tracker = LiveTensorBytes(trainer.device)
    tracker.track(trainer.engine.model.parameters())
    tracker.track(t for st in trainer.engine.optimizer.state.values() for t in st.values())
    with tracker:
        trainer.train_step()
    peak = tracker.peak
    rank = int(os.environ.get("RANK", "0"))
    pp_rank = trainer.dims.pp_rank(rank)
    planned = pipeline_memory(trainer.cfg, trainer.dims)[pp_rank].total_gb() * 2**30
    (run / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "pp_rank": pp_rank,
                "peak": peak,
                "planned": planned,
                "median_step_s": statistics.median(times),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", default="2,4", help="pipeline degrees (comma-separated)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per schedule")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    args = p.parse_args()
    if "MEGALITE_BENCH_WORKER" in os.environ:
        # Settings come by environment: torchrun would take option-like words for its own.
        worker(json.loads(os.environ["MEGALITE_BENCH_WORKER"]))
        return

    sys.path.insert(0, str(REPO))
    from bench_parallel_memory import ensure_data

    from megalite.bench_report import git_sha
    from megalite.parallel.pp_split import bubble_fraction

    OUT.mkdir(parents=True, exist_ok=True)
    data = ensure_data()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    runs = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
    for pp in (int(x) for x in args.pp.split(",")):
        base_time = None
        for schedule in args.schedules.split(","):
            run = Path(runs.name) / f"pp{pp}-{schedule}"  # run dirs are scratch
            run.mkdir(parents=True)
            spec = {
                "pp": pp,
                "schedule": schedule,
                "data": str(data),
                "run": str(run),
                "steps": args.steps,
            }
            cmd = [
                str(Path(sys.executable).parent / "torchrun"),
                "--standalone",
                f"--nproc_per_node={pp}",
                __file__,
            ]
            env = dict(
                os.environ,
                OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO),
                MEGALITE_BENCH_WORKER=json.dumps(spec),
            )
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"pp={pp} {schedule}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
                continue
            ranks = [json.loads(f.read_text()) for f in sorted(run.glob("rank*.json"))]
            step = max(r["median_step_s"] for r in ranks)
            base_time = base_time or (step if schedule == "1f1b" else None)
            v = 2 if schedule in ("interleaved_1f1b", "zbv") else 1
            bubble = bubble_fraction(schedule, pp, CHUNKS, v)
            for r in sorted(ranks, key=lambda r: r["pp_rank"]):
                rows.append(
                    {
                        "pp": pp,
                        "schedule": schedule,
                        "pp_rank": r["pp_rank"],
                        "measured_peak_mb": r["peak"] / 2**20,
                        "planned_mb": r["planned"] / 2**20,
                        "memory_ratio": r["peak"] / r["planned"],
                        "median_step_s": step,
                        "step_vs_1f1b": step / base_time if base_time else None,
                        "bubble_formula": bubble,
                        "microbatches": CHUNKS,
                        "git_sha": git_sha(),
                        "device": "cpu",
                        "timestamp": stamp,
                    }
                )
                print(
                    f"pp={pp} {schedule:17s} rank {r['pp_rank']}: peak "
                    f"{r['peak'] / 2**20:7.1f} MB, planned {r['planned'] / 2**20:7.1f} MB "
                    f"(x{r['peak'] / r['planned']:.2f}) | step {step * 1e3:7.1f} ms"
                    + (f" (x{step / base_time:.2f} of 1f1b)" if base_time else "")
                    + f" | bubble formula {bubble:.1%}",
                    flush=True,
                )
    from megalite.kernels import _bench

    _bench.write_csv(OUT / f"pipeline-{stamp}.csv", rows)


if __name__ == "__main__":
    main()
