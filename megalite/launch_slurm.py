"""The SLURM batch job of `megalite-launch slurm`: its options (`SlurmJob`, checked as they are
given), sbatch's time limit, the batch script rendered from a template, and its submission.

The batch script is `launch/slurm.sbatch` (shipped as `megalite.launch_templates`) with its
`{{name}}` placeholders filled in. A `#SBATCH` line whose value is empty (no account, no GPUs) is
left out, and so is a line holding only an empty block. Values that land in shell code are
quoted with `shlex.quote`. The CLI (megalite/launch.py) builds the job, estimates the grace of
SLURM's warning before the time limit, and renders or submits.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megalite.errors import LaunchError

CONTAINER_RUNTIMES = ("none", "pyxis", "apptainer")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,-]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def template_dir() -> Path:
    spec = importlib.util.find_spec("megalite.launch_templates")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            "the launch templates (package megalite.launch_templates) are not installed; "
            "reinstall megalite (pip install -e .)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_torchrun(in_container: bool = False) -> str:
    """The torchrun next to this Python (the venv megalite runs from), else the one on PATH.
    Inside a container the image's own `torchrun` is meant."""
    beside = Path(sys.executable).parent / "torchrun"
    return "torchrun" if in_container or not beside.exists() else str(beside)


def last_override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


def at_least(flag: str, value: int, low: int) -> None:
    """A command-line number's lower bound (the local job and the CLI check theirs too)."""
    if value < low:
        raise LaunchError(f"{flag}={value} must be >= {low}")


# ----------------------------------------------------------------------------------------- job
@dataclass
class SlurmJob:
    """One sbatch job: `nodes` x one torchrun agent, each starting `nproc_per_node` workers."""

    nodes: int
    job_name: str = "megalite"
    gpus_per_node: int = 8
    # None: one per GPU, or 1 on nodes without GPUs.
    nproc_per_node: int | None = None
    # None: 8 per worker with GPUs, else one per worker.
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    output_dir: str = "logs"
    # None: the last train.run_dir override, else runs/<job_name>.
    run_dir: str | None = None
    env: list[str] = field(default_factory=list)
    container_image: str | None = None
    # None: apptainer for a .sif image, pyxis for any other image, none without one.
    container_runtime: str | None = None
    container_mounts: str | None = None
    # Seconds of warning before the time limit; None until `set_grace` (run_slurm estimates it).
    signal_grace: int | None = None
    # Where the grace came from, for the script's header (set by set_grace).
    grace_note: str = ""
    max_restarts: int = 3
    # None: 20000 + job id % 10000, computed in the script.
    rdzv_port: int | None = None
    torchrun: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        at_least("--nodes", self.nodes, 1)
        at_least("--gpus-per-node", self.gpus_per_node, 0)
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or 1
        at_least("--nproc-per-node", self.nproc_per_node, 1)
        if self.gpus_per_node and self.nproc_per_node > self.gpus_per_node:
            raise LaunchError(
                f"--nproc-per-node={self.nproc_per_node} is more than --gpus-per-node="
                f"{self.gpus_per_node}; start at most one worker per GPU"
            )
        if self.cpus_per_task is None:
            self.cpus_per_task = self.nproc_per_node * (8 if self.gpus_per_node else 1)
        at_least("--cpus-per-task", self.cpus_per_task, 1)
        if not _NAME.match(self.job_name):
            raise LaunchError(
                f"--job-name={self.job_name!r} must be letters, digits, '.', '_' or '-' (it "
                "names the log file and the script); e.g. --job-name llama3-8b"
            )
        for flag, value in (
            ("--partition", self.partition),
            ("--account", self.account),
            ("--qos", self.qos),
        ):
            if value is not None and not _SLURM_WORD.match(value):
                raise LaunchError(
                    f"{flag}={value!r} is not a SLURM name (letters, digits, '_', '.', '-', "
                    "',' for a list); check `sinfo` / `sacctmgr show assoc` for the right one"
                )
        if self.time is not None:
            time_limit_seconds(self.time)
        if self.signal_grace is not None:
            self.set_grace(self.signal_grace)
        for item in self.env:
            key, eq, _ = item.partition("=")
            if not eq or not _ENV_KEY.match(key):
                raise LaunchError(
                    f"--env {item!r} is not KEY=VALUE with a shell variable name as KEY; "
                    "e.g. --env NCCL_DEBUG=INFO"
                )
        if self.container_runtime is None:
            if self.container_image is None:
                self.container_runtime = "none"
            else:
                sif = self.container_image.endswith(".sif")
                self.container_runtime = "apptainer" if sif else "pyxis"
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise LaunchError(
                f"--container-runtime={self.container_runtime!r} is not one of "
                f"{', '.join(CONTAINER_RUNTIMES)}; pick one of them"
            )
        if self.container_runtime != "none" and not self.container_image:
            raise LaunchError(
                f"--container-runtime={self.container_runtime} needs --container-image "
                "(an enroot/docker image for pyxis, a .sif file for apptainer)"
            )
        if self.rdzv_port is not None and not 1024 <= self.rdzv_port <= 65535:
            raise LaunchError(
                f"--rdzv-port={self.rdzv_port} is not a port in 1024-65535; pick a free port "
                "or leave it out (20000 + job id % 10000)"
            )
        at_least("--max-restarts", self.max_restarts, 0)
        for arg in self.sbatch_args:
            if not arg.startswith("-") or "\n" in arg:
                raise LaunchError(
                    f"--sbatch-arg={arg!r} is not one sbatch option; write e.g. "
                    "--sbatch-arg=--mem=0 or --sbatch-arg=--exclusive"
                )
        from_overrides = last_override(self.overrides, "train.run_dir")
        if self.run_dir is not None and from_overrides not in (None, self.run_dir):
            raise LaunchError(
                f"--run-dir={self.run_dir} and the override train.run_dir={from_overrides} "
                "disagree; give the run dir once"
            )
        self.run_dir = self.run_dir or from_overrides or f"runs/{self.job_name}"
        # The script passes the run dir itself (it checks RUN_DIR/PREEMPTED after srun).
        self.overrides = [o for o in self.overrides if not o.startswith("train.run_dir=")]
        if self.torchrun is None:
            self.torchrun = default_torchrun(in_container=self.container_runtime != "none")

    def set_grace(self, seconds: int, estimate: str | None = None) -> None:
        """Sets the warning's lead before the time limit: given by --signal-grace, or (with
        `estimate`, how it was found) estimated."""
        given = estimate is None
        what = f"--signal-grace={seconds} s" if given else f"the grace of {seconds} s ({estimate})"
        at_least("--signal-grace", seconds, 1)
        if seconds > 65535:
            raise LaunchError(f"{what} exceeds SLURM's maximum of 65535 s; give a shorter grace")
        limit = time_limit_seconds(self.time) if self.time is not None else None
        if limit is not None and seconds >= limit:
            fix = "lower --signal-grace" if given else "give a shorter --signal-grace"
            raise LaunchError(
                f"{what} is not shorter than --time={self.time} ({limit} s), so the warning "
                f"would come before any training; {fix} or raise --time"
            )
        self.signal_grace = seconds
        self.grace_note = "given by --signal-grace" if given else estimate

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def script_name(self) -> str:
        return f"{self.job_name}.sbatch"


def time_limit_seconds(value: str) -> int | None:
    """sbatch's --time in seconds (None for UNLIMITED / INFINITE)."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise LaunchError(
            f"--time={value!r} is not a SLURM time limit; write minutes, HH:MM:SS or "
            "D-HH:MM:SS, e.g. --time 24:00:00"
        )
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:
        if b is None:
            seconds = a * 60  # minutes
        elif c is None:
            seconds = a * 60 + b  # minutes:seconds
        else:
            seconds = a * 3600 + b * 60 + c  # hours:minutes:seconds
    else:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise LaunchError(f"--time={value!r} is zero; give a positive time limit")
    return seconds


def render(template: str, values: dict[str, str]) -> str:
    """Fills `{{name}}` placeholders. A `#SBATCH` line with an empty value, and a line that is
    only an empty placeholder, are dropped; an unknown placeholder is a bug in the template."""
    out = []
    for line in template.splitlines():
        names = PLACEHOLDER.findall(line)
        missing = [n for n in names if n not in values]
        if missing:
            raise KeyError(f"template placeholder(s) {missing} have no value")
        empty = any(values[n] == "" for n in names)
        if empty and (line.startswith("#SBATCH") or line.strip() == "{{" + names[0] + "}}"):
            continue
        out.append(PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def comment_command(argv: list[str], width: int = 96) -> str:
    """A command as shell comment lines, wrapped with backslashes so it can be pasted back."""
    lines, line = [], "#   "
    for word in (shlex.quote(a) for a in argv):
        if len(line) + len(word) + 2 > width and line.strip("# "):
            lines.append(line + " \\")
            line = "#     "
        line += ("" if line.endswith("  ") else " ") + word
    return "\n".join([*lines, line])


def sbatch_values(job: SlurmJob, command: str) -> dict[str, str]:
    assert job.signal_grace is not None, "SlurmJob.set_grace before rendering"
    q = shlex.quote
    port = str(job.rdzv_port) if job.rdzv_port else "$(( 20000 + SLURM_JOB_ID % 10000 ))"
    mounts = q(job.container_mounts) if job.container_mounts else "$SLURM_SUBMIT_DIR"
    env_lines = []
    for item in job.env:
        key, _, value = item.partition("=")
        env_lines.append(f"export {key}={q(value)}")
    return {
        "command": command,
        "script_name": job.script_name,
        "job_name": job.job_name,
        "nodes": str(job.nodes),
        "gpus_per_node": str(job.gpus_per_node) if job.gpus_per_node else "",
        "nproc_per_node": str(job.nproc_per_node),
        "cpus_per_task": str(job.cpus_per_task),
        "partition": job.partition or "",
        "account": job.account or "",
        "qos": job.qos or "",
        "time": job.time or "",
        "output_dir": job.output_dir.rstrip("/") or "/",
        "signal_grace": str(job.signal_grace),
        "grace_note": textwrap.fill(
            f"The warning's lead, {job.signal_grace} s: {job.grace_note}",
            width=96,
            initial_indent="# ",
            subsequent_indent="#   ",
            break_on_hyphens=False,
        ),
        "sbatch_extra": "\n".join(f"#SBATCH {a}" for a in job.sbatch_args),
        "run_dir": q(job.run_dir),
        "overrides": "\n".join(f"  {q(o)}" for o in job.overrides),
        "torchrun": q(job.torchrun),
        "max_restarts": str(job.max_restarts),
        "env_exports": "\n".join(env_lines),
        "container_runtime": job.container_runtime,
        "container_image": q(job.container_image or ""),
        "container_mounts": mounts,
        "rdzv_port": port,
    }


def render_sbatch(job: SlurmJob, argv: list[str] | None = None) -> str:
    """The batch script; `argv` (the megalite-launch arguments) is recorded in its header."""
    template = (template_dir() / "slurm.sbatch").read_text()
    argv = [a for a in (argv or ["slurm", "..."]) if a != "--dry-run"]
    command = comment_command(["megalite-launch", *argv])
    return render(template, sbatch_values(job, command))


def sbatch_directives(**options: object) -> list[str]:
    """`#SBATCH --key=value` for each option given (None and empty values left out); keys are
    sbatch's long options with `_` for `-`."""
    return [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in options.items() if v]


def require_sbatch() -> str:
    """sbatch's path, or one error; called before anything is written."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "sbatch is not on PATH; run this on a SLURM login node, or add --dry-run to print "
            "the script"
        )
    return sbatch


def sbatch_file(path: Path, args: Sequence[str] = ()) -> str:
    """`sbatch --parsable [args] path`: the job id, or one error naming the script (kept)."""
    sbatch = require_sbatch()
    res = subprocess.run([sbatch, "--parsable", *args, str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise LaunchError(
            f"sbatch {path} failed (exit {res.returncode}): {res.stderr.strip()}; the script is "
            f"kept at {path}"
        )
    return res.stdout.strip().split(";")[0]


def submit(job: SlurmJob, script: str) -> tuple[str, Path]:
    """Writes the script to <output_dir>/<job_name>.sbatch, submits it; returns (job id, path)."""
    require_sbatch()
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path = out / job.script_name
    path.write_text(script)
    path.chmod(0o755)
    return sbatch_file(path), path
