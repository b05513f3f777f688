"""megalite-launch's jobs beside training: `eval-watch` (the checkpoint watcher of
eval_watch.py as a SLURM job of its own) and `prepare` (`megalite-data prepare` as a SLURM job
array, data/slurm_prepare.py).

The watcher job runs `megalite-eval watch RUN_DIR` on its own allocation (a GPU of its own with
`--gpus 1`), so training's nodes never run an eval; it exits once the run has finished and its last
checkpoint is evaluated. Submitted before the training job has created its run dir, it waits for
that job to start (`--after JOBID`: `#SBATCH --dependency=after:JOBID`) and for its config.yaml.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megalite.errors import LaunchError
from megalite.launch_slurm import (
    at_least,
    require_sbatch,
    sbatch_directives,
    sbatch_file,
    time_limit_seconds,
)

_WATCH = """#!/bin/bash
# megalite-eval watch as a job of its own, rendered by megalite-launch eval-watch.
#SBATCH --job-name={name}
#SBATCH --output={logs}/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={cpus}
{extra}
set -euo pipefail
{wait}exec {python} -m megalite.evaluate watch {run_dir} {args}
"""


@dataclass
class WatchJob:
    run_dir: str
    watch_args: list[str] = field(default_factory=list)
    job_name: str = "megalite-eval"
    gpus: int = 0
    cpus_per_task: int = 4
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    after: str | None = None  # the training job's id
    output_dir: str = "logs"

    def __post_init__(self) -> None:
        at_least("--gpus", self.gpus, 0)
        at_least("--cpus-per-task", self.cpus_per_task, 1)
        if self.time is not None:
            time_limit_seconds(self.time)
        if self.after is not None and not self.after.isdigit():
            raise LaunchError(f"--after={self.after!r} is not a job id; give the training job's id")
        if self.after is None and not Path(self.run_dir).is_dir():
            raise LaunchError(
                f"run dir {self.run_dir!r} does not exist; start training first, or give "
                "--after <training job id> so the watcher starts with it"
            )

    def script(self) -> str:
        extra = sbatch_directives(
            gres=f"gpu:{self.gpus}" if self.gpus else None,
            partition=self.partition,
            account=self.account,
            time=self.time,
            dependency=f"after:{self.after}" if self.after is not None else None,
        )
        args = list(self.watch_args)
        if self.gpus and not any(a == "--device" or a.startswith("--device=") for a in args):
            args += ["--device", "cuda"]
        run_dir = shlex.quote(str(Path(self.run_dir).resolve()))
        # Started with the training job, the watcher may come up before training has written
        # the run's config (where it reads eval.harness and train.max_steps).
        config = shlex.quote(str(Path(self.run_dir).resolve() / "config.yaml"))
        wait = f"until [ -f {config} ]; do sleep 10; done\n" if self.after is not None else ""
        return _WATCH.format(
            wait=wait,
            name=self.job_name,
            logs=self.output_dir,
            cpus=self.cpus_per_task,
            extra="\n".join(extra),
            python=shlex.quote(sys.executable),
            run_dir=run_dir,
            args=shlex.join(args),
        )


def submit_watch(job: WatchJob, dry_run: bool = False) -> str | None:
    text = job.script()
    if dry_run:
        sys.stdout.write(text)
        return None
    require_sbatch()
    logs = Path(job.output_dir)
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path = logs / f"{job.job_name}.sbatch"
    path.write_text(text)
    return sbatch_file(path)


def run_eval_watch(args) -> int:
    job = WatchJob(
        run_dir=args.run_dir,
        watch_args=args.watch_args,
        job_name=args.job_name,
        gpus=args.gpus,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        after=args.after,
        output_dir=args.output_dir,
    )
    job_id = submit_watch(job, args.dry_run)
    if job_id is not None:
        log = Path(job.output_dir) / f"{job.job_name}-{job_id}.out"
        print(
            f"submitted the watcher of {job.run_dir} as job {job_id}; log: {log}", file=sys.stderr
        )
        print(job_id)
    return 0


def run_prepare(args) -> int:
    """`megalite-data prepare ARGS --executor slurm`: the same options, checks and job array."""
    from megalite.data.cli import main as data_main

    rest = args.prepare_args[1:] if args.prepare_args[:1] == ["--"] else args.prepare_args
    if any(a == "--executor" or a.startswith("--executor=") for a in rest):
        raise LaunchError(
            "megalite-launch prepare always submits a SLURM job array: drop --executor (or run "
            "`megalite-data prepare --executor local` to prepare on this machine)"
        )
    return data_main(["prepare", *rest, "--executor", "slurm"])


def add_parsers(sub) -> None:
    watch = sub.add_parser(
        "eval-watch",
        help="megalite-eval watch RUN_DIR as a SLURM job of its own",
        description="Submit the checkpoint watcher (megalite-eval watch) as its own SLURM job. "
        "Arguments after `--` go to megalite-eval watch (e.g. -- --tasks hellaswag --every 1000).",
    )
    watch.add_argument("run_dir", help="the training run's dir (train.run_dir)")
    watch.add_argument("--gpus", type=int, default=0, help="GPUs for the watcher (0: CPU)")
    watch.add_argument("--cpus-per-task", type=int, default=4, help="CPUs (4)")
    watch.add_argument("--partition")
    watch.add_argument("--account")
    watch.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    watch.add_argument("--job-name", default="megalite-eval")
    watch.add_argument("--output-dir", default="logs", help="SLURM log dir (logs)")
    watch.add_argument(
        "--after", metavar="JOBID", help="the training job: start once it has started"
    )
    watch.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    watch.add_argument("watch_args", nargs="*", help="options for megalite-eval watch")

    prep = sub.add_parser(
        "prepare",
        help="megalite-data prepare as a SLURM job array (its tasks, then the merge)",
        description="`megalite-data prepare ARGS --executor slurm`: the tasks as a SLURM job "
        "array and the merge as a job after it. Takes prepare's arguments (--tasks, --partition, "
        "--time, --dry-run, ...); see megalite-data prepare --help.",
        add_help=False,
    )
    prep.add_argument("prepare_args", nargs="...", help="megalite-data prepare's arguments")
