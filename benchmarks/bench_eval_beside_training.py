"""Training step time with and without harness evals beside it (eval.harness.every): the cost
the `megalite-eval watch` process puts on the run it watches.

    .venv/bin/python benchmarks/bench_eval_beside_training.py [--rounds 2] [--steps 200]

Each round trains the demo model (experiment=cpu_demo, from scratch, one torch thread) twice,
in alternating order: once plain, once with eval.harness.every set (the local tasks of
tests/harness_tasks, limited to a few examples, so evals run while training does). The step
time of a run is the median of its per-step times (metrics.jsonl, log_every=1) after a warm-up;
the ratio is median(with) / median(without) over the rounds, from the same process and machine.
`evals_during_training` counts the harness evals that finished before training did: a ratio
measured with none would not measure anything. Between runs the watcher is waited for, so it
never overlaps the next run. The claim in the issue is for an otherwise idle machine; on a
shared one, load from other work falls on both runs alike but widens the spread.
Rows go to benchmarks/results/eval-beside-training-<timestamp>.csv with the git SHA, device and
timestamp.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
TASKS = "[megalite_tiny_mc,megalite_tiny_rolling]"


def one_run(run_dir: Path, steps: int, every: int, data: Path) -> tuple[float, int, float]:
    """(median step time after warm-up, harness evals done when training ended, eval seconds
    after training ended) of one training run."""
    from megalite.compose import compose_config
    from megalite.metrics import read_metrics
    from megalite.trainer import Trainer

    overrides = [
        "experiment=cpu_demo",
        f"data.dir={data}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.eval_every={steps}",
        f"train.ckpt_every={every}",
        "train.keep_last=100",
        "train.precision=fp32",
        "train.plot=false",
    ]
    if every:
        overrides += [
            f"eval.harness.every={every}",
            f"eval.harness.tasks={TASKS}",
            f"eval.harness.include_path={REPO / 'tests' / 'harness_tasks'}",
            "eval.harness.limit=4",
        ]
    trainer = Trainer(compose_config(overrides))
    trainer.fit()
    watcher = trainer.eval_watcher
    done = len(list((run_dir / "harness").glob("step_*.json"))) if watcher else 0
    t0 = time.perf_counter()
    if watcher is not None:
        watcher.process.wait()
    tail = time.perf_counter() - t0
    del trainer
    gc.collect()
    times = [r["step_time_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    warm = min(10, len(times) // 4)
    return statistics.median(times[warm:]), done, tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="eval.harness.every (and ckpt_every)")
    args = p.parse_args()
    os.chdir(REPO)  # the task YAMLs' data_files are relative to the repository root
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_overhead import data_dir

    from megalite.bench_report import git_sha
    from megalite.metrics import device_name

    data = data_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        for r in range(args.rounds):
            order = [0, args.every] if r % 2 == 0 else [args.every, 0]
            for every in order:
                run_dir = Path(tmp) / f"r{r}-every{every}"
                step, done, tail = one_run(run_dir, args.steps, every, data)
                rows.append({"round": r, "watcher": bool(every), "median_step_s": step,
                             "evals_during_training": done, "eval_tail_s": tail})  # fmt: skip
                print(
                    f"round {r} watcher={bool(every)}: median step {step * 1e3:.1f} ms, "
                    f"{done} evals done during training, {tail:.1f} s of evals after"
                )
    with_w = [x["median_step_s"] for x in rows if x["watcher"]]
    without = [x["median_step_s"] for x in rows if not x["watcher"]]
    ratio = statistics.median(with_w) / statistics.median(without)
    per_round = [a / b for a, b in zip(with_w, without)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "timestamp": stamp,
        "git_sha": git_sha(),
        "device": device_name(torch.device("cpu")),
        "steps": args.steps,
        "every": args.every,
    }
    from megalite.kernels import _bench

    path = _bench.write_csv(
        OUT / f"eval-beside-training-{stamp}.csv",
        [{**meta, **row, "ratio_with_over_without": ratio} for row in rows],
    )
    print(
        f"step time with / without the watcher: {ratio:.3f} (per round: "
        + ", ".join(f"{x:.3f}" for x in per_round)
        + f"); {sum(x['evals_during_training'] for x in rows)} evals overlapped training; {path}"
    )


if __name__ == "__main__":
    main()
