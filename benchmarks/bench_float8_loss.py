"""Float8 training against bf16 on the demo recipe (conf/experiment/cpu_demo.yaml): the same data,
seed and schedule, `steps` optimizer steps each of train.float8=none (bf16), tensorwise and
rowwise; prints and saves the final training losses and their ratio to bf16's.

    python benchmarks/bench_float8_loss.py [--steps 100] [--out benchmarks/results/float8_loss.csv]
        [--runs DIR] [--recipes none tensorwise rowwise]

With --runs the run dirs are kept in DIR/<recipe>, and a recipe whose run there already has all
its steps is read instead of run again (recipes may run in separate processes, then one more
call with all of them writes the comparison).

On a CPU float8 is emulated (megalite/parallel/float8.py): the same quantization as the float8
GEMMs, so the losses are what a GPU run computes up to accumulation order; the speed is not.
The issue's bar: every float8 final loss within 3 % of bf16's.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from megalite.kernels import _bench

from megalite.compose import compose_config
from megalite.metrics import read_metrics
from megalite.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("none", "tensorwise", "rowwise")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def final_loss(recipe: str, steps: int, root: Path, extra: list[str]) -> tuple[float, float, float]:
    """(final training loss, mean of the last 10 steps' losses, seconds) of one run."""
    run = root / recipe
    if run.is_dir() and len(_losses(run)) == steps:  # done earlier (--runs)
        losses = _losses(run)
        return losses[-1], sum(losses[-10:]) / len(losses[-10:]), float("nan")
    overrides = [
        "experiment=cpu_demo",
        "parallel=single",
        "train.precision=bf16",
        f"train.float8={recipe}",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.log_every=1",
        "train.plot=false",
        f"train.run_dir={run}",
        *extra,
    ]
    t0 = time.perf_counter()
    Trainer(compose_config(overrides)).fit()
    seconds = time.perf_counter() - t0
    gc.collect()
    losses = _losses(run)
    tail = losses[-10:]
    return losses[-1], sum(tail) / len(tail), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/float8_loss.csv"))
    p.add_argument("--runs", default=None, help="keep the run dirs here (default: temporary)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("extra", nargs="*", help="more megalite-train overrides")
    args = p.parse_args()
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        results = {r: final_loss(r, args.steps, root, args.extra) for r in args.recipes}
    if "none" not in results:
        print("no bf16 run among --recipes: nothing to compare; run again with all of them")
        return
    ref, ref_tail = results["none"][0], results["none"][1]
    for recipe, (loss, tail, seconds) in results.items():
        rows.append(
            {
                "recipe": "bf16" if recipe == "none" else f"float8 {recipe}",
                "steps": args.steps,
                "final_loss": round(loss, 5),
                "vs_bf16": round(loss / ref, 5),
                "last10_mean": round(tail, 5),
                "last10_vs_bf16": round(tail / ref_tail, 5),
                "seconds": round(seconds, 1),
                "overrides": " ".join(args.extra),
                "device": torch.backends.cpu.get_cpu_capability(),
                "git_sha": sha,
                "time": stamp,
            }
        )
        print(
            f"{rows[-1]['recipe']:>18}: final loss {loss:.4f} ({loss / ref - 1:+.2%} vs bf16), "
            f"{seconds:.0f} s"
        )
    _bench.write_csv(Path(args.out), rows)


if __name__ == "__main__":
    main()
