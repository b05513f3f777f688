"""`megalite-data prepare --tasks N --executor slurm`: the tasks as a SLURM job array, and the merge
as a second job that starts once every element succeeded (`--dependency=afterok`).

Each array element runs `prepare --config <work>/options.yaml --task $SLURM_ARRAY_TASK_ID`
(the options were checked and saved before submitting), writes its result atomically and exits;
a failed element can be resubmitted alone (`sbatch --array=K <tasks script>`), and the merge job,
left pending by the failed dependency, can then be resubmitted (`sbatch <merge script>`). The
scripts are written to the log dir and kept, so both are one command. SLURM options are checked
with megalite-launch's rules (launch_slurm.py).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from megalite.launch_slurm import (
    at_least,
    require_sbatch,
    sbatch_directives,
    sbatch_file,
    time_limit_seconds,
)

_TEMPLATE = """#!/bin/bash
# {what}, rendered by megalite-data prepare --executor slurm.
#SBATCH --job-name={name}
#SBATCH --output={logs}/%x-%A_%a.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={cpus}
{extra}
set -euo pipefail
exec {python} -m megalite.data.cli prepare --config {config} {step}
"""


@dataclass
class SlurmArray:
    tasks: int
    job_name: str = "megalite-prepare"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int = 1
    log_dir: str = "logs"

    def __post_init__(self) -> None:
        at_least("--tasks", self.tasks, 1)
        at_least("--workers (CPUs per task)", self.cpus_per_task, 1)
        if self.time is not None:
            time_limit_seconds(self.time)

    def _extra(self, array: bool) -> str:
        array_range = f"0-{self.tasks - 1}" if array else None
        return "\n".join(
            sbatch_directives(
                array=array_range, partition=self.partition, account=self.account, time=self.time
            )
        )

    def scripts(self, config: Path) -> tuple[str, str]:
        """(the array's script, the merge's script)."""
        common = {
            "name": self.job_name,
            "logs": self.log_dir,
            "cpus": self.cpus_per_task,
            "python": shlex.quote(sys.executable),
            "config": shlex.quote(str(config.resolve())),
        }
        tasks = _TEMPLATE.format(
            what=f"{self.tasks} prepare tasks, one per array element",
            extra=self._extra(True),
            step='--task "$SLURM_ARRAY_TASK_ID"',
            **common,
        )
        merge = _TEMPLATE.format(
            what="the merge of the prepare tasks",
            extra=self._extra(False),
            step="--merge",
            **common,
        )
        return tasks, merge


def submit_array(job: SlurmArray, config: Path, dry_run: bool = False) -> tuple[str, str] | None:
    """Writes both scripts beside the logs and submits them; returns (array id, merge id)."""
    tasks, merge = job.scripts(config)
    if dry_run:
        print(tasks)
        print(merge)
        return None
    require_sbatch()  # before anything is written
    logs = Path(job.log_dir)
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    paths = []
    for name, text in (("tasks", tasks), ("merge", merge)):
        path = logs / f"{job.job_name}-{name}.sbatch"
        path.write_text(text)
        paths.append(path)
    array_id = sbatch_file(paths[0])
    merge_id = sbatch_file(paths[1], [f"--dependency=afterok:{array_id}"])
    return array_id, merge_id
