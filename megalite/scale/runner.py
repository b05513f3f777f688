"""`megalite-scale run` and `collect`: train every run of a grid and gather the final losses.

- Here, one run after another: each run is a `megalite-train` process (a grid planned with
  --world-size N > 1, or `run --torchrun`: `megalite-launch local --nproc N`, i.e. torchrun).
- On SLURM (`run --slurm`): one job array, one task per unfinished run, its batch script rendered
  by `megalite-launch slurm` (megalite/launch_slurm.py) with a few lines that pick the task's
  run; `collect` (or `run` again) gathers the results when the tasks are done.

Resumable: a run is finished when its run dir holds summary.json (the trainer writes it after
the last step's eval) with a finite val_loss; finished runs are skipped. Every run trains with
train.resume=auto, so a run that was killed continues from its newest checkpoint (half way). A
run that fails is reported (exit status, log) and the others go on.

The final loss of a run is summary.json's `val_loss`: the mean cross-entropy over the first
train.eval_batches validation batches (the same batches for every run), evaluated once after
the last step. Not a training loss: the val set is held out and identical across the grid, so
the runs are compared on the same tokens.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megalite.errors import LaunchError
from megalite.rundir import RunDir
from megalite.scale.grid import read_grid, run_overrides

RESULT_COLUMNS = ("params", "tokens", "flops", "loss", "run_dir", "run", "budget", "flops_6nd")
BIN = Path(sys.executable).parent


@dataclass
class RunStatus:
    run: str
    state: str  # done | failed | pending | diverged
    detail: str = ""
    result: dict[str, object] | None = None


@dataclass
class Report:
    statuses: list[RunStatus] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def by_state(self, state: str) -> list[RunStatus]:
        return [s for s in self.statuses if s.state == state]

    def summary(self) -> str:
        lines = []
        for s in self.statuses:
            if s.state != "done":
                lines.append(f"  {s.run}: {s.state}{': ' + s.detail if s.detail else ''}")
        counts = ", ".join(
            f"{len(self.by_state(k))} {k}" for k in ("done", "failed", "diverged", "pending")
        )
        return "\n".join([f"{len(self.statuses)} runs: {counts}", *lines])


def run_dir(grid_dir: Path, run: str) -> Path:
    return Path(grid_dir).resolve() / "runs" / run


def run_status(grid_dir: Path, row: dict[str, str]) -> RunStatus:
    """A run's state from its run dir (summary.json), with its result row when done."""
    rd = RunDir(run_dir(grid_dir, row["run"]))
    if not rd.summary.is_file():
        return RunStatus(row["run"], "pending")
    summary = json.loads(rd.summary.read_text())
    loss = summary.get("val_loss")
    if loss is None or not math.isfinite(loss):
        return RunStatus(row["run"], "diverged", f"val_loss {loss} in {rd.summary}")
    tokens = int(summary["tokens"])
    params = int(summary["n_params"])
    # The grid's FLOPs were counted for the planned tokens; scale them to the tokens trained.
    flops = float(row["flops"]) * tokens / int(row["tokens"])
    result = {
        "params": params,
        "tokens": tokens,
        "flops": f"{flops:.6g}",
        "loss": f"{loss:.6f}",
        "run_dir": str(rd.path),
        "run": row["run"],
        "budget": row["budget"],
        "flops_6nd": f"{6.0 * params * tokens:.6g}",
    }
    return RunStatus(row["run"], "done", result=result)


def collect(grid: Path) -> Report:
    """Every run's state; writes GRID/results.csv with the finished ones (all of them, whether
    finished now or earlier)."""
    grid_dir, rows = read_grid(grid)
    report = Report([run_status(grid_dir, row) for row in rows])
    write_results(grid_dir / "results.csv", [s.result for s in report.by_state("done")])
    return report


def write_results(path: Path, results: list[dict[str, object]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    os.replace(tmp, path)


def plan_world_size(grid_dir: Path) -> int:
    plan = Path(grid_dir) / "plan.json"
    return int(json.loads(plan.read_text()).get("world_size", 1)) if plan.is_file() else 1


def train_command(grid_dir: Path, run: str, world_size: int, torchrun: bool) -> list[str]:
    overrides = run_overrides(grid_dir, run)
    if world_size > 1 or torchrun:
        # No elastic restarts: a failed run is reported, and the next `run` resumes it.
        launch = [str(BIN / "megalite-launch"), "local", f"--nproc={world_size}"]
        return [*launch, "--max-restarts=0", "--", *overrides]
    return [str(BIN / "megalite-train"), *overrides]


def run_local(grid: Path, torchrun: bool = False, log=print) -> Report:
    """Trains every unfinished run here, one after another; returns the final report (and
    writes results.csv). Each run's output goes to GRID/logs/<run>.log (appended)."""
    grid_dir, rows = read_grid(grid)
    world_size = plan_world_size(grid_dir)
    logs = grid_dir / "logs"
    logs.mkdir(exist_ok=True)
    ran = []
    for i, row in enumerate(rows):
        status = run_status(grid_dir, row)
        if status.state == "done":
            log(f"[{i + 1}/{len(rows)}] {row['run']}: done, skipped")
            continue
        log(
            f"[{i + 1}/{len(rows)}] {row['run']}: {int(row['params']):,} params x "
            f"{int(row['tokens']):,} tokens ({row['steps']} steps)"
        )
        cmd = train_command(grid_dir, row["run"], world_size, torchrun)
        with open(logs / f"{row['run']}.log", "a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        ran.append(row["run"])
        after = run_status(grid_dir, row)
        if after.state != "done":
            why = f"exit status {proc.returncode}" if proc.returncode else after.detail
            log(f"    failed ({why or 'no summary.json'}); log: {logs / (row['run'] + '.log')}")
    report = collect(grid_dir)
    report.ran = ran
    for s in report.statuses:
        if s.state == "pending" and s.run in ran:
            s.state = "failed"
            s.detail = f"see {logs / (s.run + '.log')}"
    return report


# ------------------------------------------------------------------------------------- SLURM
ARRAY_ANCHOR = "set -euo pipefail\n"


def array_lines(tasks: Path, runs: Path) -> str:
    """The lines the array job's script runs first: task i trains line i + 1 of the task list,
    in its own run dir (RUN_DIR) with its own experiment (arguments after the overrides)."""
    return (
        "\n# ---- megalite-scale: this array task's run (line SLURM_ARRAY_TASK_ID + 1 of the "
        "task list) ----\n"
        f'SCALE_RUN=$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" {tasks})\n'
        f"RUN_DIR={runs}/$SCALE_RUN\n"
        'set -- experiment="$SCALE_RUN" "$@"\n'
    )


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    gpu: str = "h100"
    max_parallel: int | None = None  # %N: at most N tasks at once
    dry_run: bool = False


def submit_array(grid: Path, opts: SlurmOptions, argv: list[str] | None = None) -> str:
    """Submits one SLURM job array over the unfinished runs (or, dry run, returns its script);
    returns the job id or the script."""
    from megalite.launch import check_config, estimate_grace
    from megalite.launch_slurm import SlurmJob, render_sbatch, submit

    grid_dir, rows = read_grid(grid)
    grid_dir = grid_dir.resolve()
    pending = [r["run"] for r in rows if run_status(grid_dir, r).state != "done"]
    if not pending:
        raise LaunchError(f"every run of {grid_dir} is done; nothing to submit (`collect` it)")
    slurm_dir = grid_dir / "slurm"
    slurm_dir.mkdir(exist_ok=True)
    tasks = slurm_dir / "tasks.txt"
    array = f"--array=0-{len(pending) - 1}"
    if opts.max_parallel:
        array += f"%{opts.max_parallel}"
    common = run_overrides(grid_dir, pending[0])[:1]  # the search path; experiment per task
    job = SlurmJob(
        nodes=opts.nodes,
        job_name=f"scale-{grid_dir.name}",
        gpus_per_node=opts.gpus_per_node,
        nproc_per_node=opts.nproc_per_node,
        cpus_per_task=opts.cpus_per_task,
        partition=opts.partition,
        account=opts.account,
        qos=opts.qos,
        time=opts.time,
        output_dir=str(slurm_dir / "logs"),
        run_dir=str(grid_dir / "runs" / pending[0]),
        sbatch_args=[array],
        overrides=common,
    )
    world = plan_world_size(grid_dir)
    if job.world_size != world:
        raise LaunchError(
            f"--nodes x --nproc-per-node = {job.world_size} ranks, but the grid was planned for "
            f"--world-size={world} (its global batch); submit with {world} ranks or re-plan"
        )
    # Compose and check one run's config at this world size, and size the warning from it.
    cfg = check_config([*common, f"experiment={pending[0]}"], job.world_size)
    job.set_grace(*estimate_grace(job, cfg, gpu=opts.gpu))
    script = render_sbatch(job, ["scale-array", *(argv or [])])
    if ARRAY_ANCHOR not in script:
        raise LaunchError("launch/slurm.sbatch has no `set -euo pipefail` line to follow")
    script = script.replace(ARRAY_ANCHOR, ARRAY_ANCHOR + array_lines(tasks, grid_dir / "runs"), 1)
    if opts.dry_run:
        return script
    tasks.write_text("\n".join(pending) + "\n")
    job_id, _ = submit(job, script)
    return job_id
