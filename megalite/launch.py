"""`megalite-launch`: torchrun on this node, or a SLURM batch job rendered from a template.

    megalite-launch local --nproc 8 -- model=llama3_1b parallel=fsdp
    megalite-launch local --nproc 2 --dry-run -- parallel=ddp       # print the torchrun command
    megalite-launch slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --job-name llama3-8b -- model=llama3_8b parallel=fsdp_tp    # sbatch it, print the job id
    megalite-launch slurm ... --dry-run                             # print the batch script

Everything after `--` is a Hydra override for megalite-train. Launched runs default to
train.resume=auto (an explicit train.resume override wins): a restarted worker group and a
requeued job must continue the run, not refuse its run dir. Before launching, the overrides are
composed into the typed config and checked against the world size (nodes x processes per node),
so a typo fails here instead of after the queue wait; `--no-check` skips that.

SLURM warns the job (SIGUSR1 to the batch shell, which passes it on to the workers) some time
before its time limit, so the run can finish its step and write a checkpoint before it is killed.
That lead is estimated from the composed config (`plan.preemption_grace`: the step at the
`--gpu`'s peak, the checkpoint written at `--ckpt-write-gbps` per node, a `--grace-margin`, at
least 120 s) unless `--signal-grace` gives it; with `--no-check` it is the 120 s floor.

The batch script is `launch/slurm.sbatch` (shipped as `megalite.launch_templates`) with its
`{{name}}` placeholders filled in. A `#SBATCH` line whose value is empty (no account, no GPUs) is
left out, and so is a line holding only an empty block. Values that land in shell code are
quoted with `shlex.quote`. `launch/torchrun.sh` is the hand-editable twin of `local`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megalite.config import Config

# Signals torchrun catches and passes on to its workers. SIGUSR1 is SLURM's warning before the
# time limit; the trainer checkpoints and exits on SIGUSR1 and SIGTERM.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun hands every rendezvous round its own TCP store with this set; sharing one made
# elastic restarts fail with "Gloo connectFullMesh failed" (3 of 10 runs on CPU).
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
CONTAINER_RUNTIMES = ("none", "pyxis", "apptainer")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,-]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(ValueError):
    """A launch option that cannot work; the message names the flag, the value and the fix."""


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


def with_resume_default(overrides: list[str]) -> list[str]:
    # Hydra keeps the last value of a key given twice, so the user's train.resume wins.
    return ["train.resume=auto", *overrides]


def last_override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


# --------------------------------------------------------------------------------------- local
@dataclass
class LocalJob:
    """torchrun on this node: `nproc` workers, elastic restarts, signals passed to workers."""

    nproc: int
    max_restarts: int = 3
    shutdown_timeout: int = 120
    torchrun: str = "torchrun"
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _at_least("--nproc", self.nproc, 1)
        _at_least("--max-restarts", self.max_restarts, 0)
        _at_least("--shutdown-timeout", self.shutdown_timeout, 1)


def local_env(job: LocalJob, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables `local` sets (on top of the caller's environment): an equal share of the
    cores per worker unless OMP_NUM_THREADS is set, and the rendezvous store fix."""
    environ = os.environ if environ is None else environ
    env = dict(LAUNCH_ENV)
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // job.nproc))
    return env


def local_command(job: LocalJob) -> list[str]:
    return [
        job.torchrun,
        "--standalone",
        f"--nproc-per-node={job.nproc}",
        f"--max-restarts={job.max_restarts}",
        f"--signals-to-handle={SIGNALS_TO_HANDLE}",
        f"--shutdown-timeout={job.shutdown_timeout}",
        "-m",
        "megalite.train",
        *with_resume_default(job.overrides),
    ]


# --------------------------------------------------------------------------------------- slurm
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
        _at_least("--nodes", self.nodes, 1)
        _at_least("--gpus-per-node", self.gpus_per_node, 0)
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or 1
        _at_least("--nproc-per-node", self.nproc_per_node, 1)
        if self.gpus_per_node and self.nproc_per_node > self.gpus_per_node:
            raise LaunchError(
                f"--nproc-per-node={self.nproc_per_node} is more than --gpus-per-node="
                f"{self.gpus_per_node}; start at most one worker per GPU"
            )
        if self.cpus_per_task is None:
            self.cpus_per_task = self.nproc_per_node * (8 if self.gpus_per_node else 1)
        _at_least("--cpus-per-task", self.cpus_per_task, 1)
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
        _at_least("--max-restarts", self.max_restarts, 0)
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
        _at_least("--signal-grace", seconds, 1)
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


def submit(job: SlurmJob, script: str) -> tuple[str, Path]:
    """Writes the script to <output_dir>/<job_name>.sbatch, submits it; returns (job id, path)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "sbatch is not on PATH; run megalite-launch slurm on a SLURM login node, or add "
            "--dry-run to print the script"
        )
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path = out / job.script_name
    path.write_text(script)
    path.chmod(0o755)
    res = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise LaunchError(
            f"sbatch {path} failed (exit {res.returncode}): {res.stderr.strip()}; the script is "
            f"kept at {path}"
        )
    return res.stdout.strip().split(";")[0], path


# ------------------------------------------------------------------------------------ checking
def check_config(overrides: list[str], world_size: int) -> Config:
    """Composes the typed config megalite-train would build and checks it against the world
    size: unknown keys, wrong types, degrees and batch arithmetic fail before the launch."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megalite.config import ConfigError, check_world_size
    from megalite.train import compose_config

    try:
        cfg = compose_config(overrides)
        check_world_size(cfg, world_size)
        return cfg
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(
            f"{first} (megalite-train would refuse this config at world size {world_size}; "
            "--no-check skips this check)"
        ) from e


def estimate_grace(
    job: SlurmJob,
    cfg: Config | None,
    write_gb_s_per_node: float | None = None,
    margin_s: int | None = None,
    gpu: str = "h100",
) -> tuple[int, str]:
    """(seconds, how they were found) for SLURM's warning before the time limit: the estimate
    of `plan.preemption_grace` for `cfg` on this job's nodes (None: plan's assumptions), or
    its floor without a config."""
    from megalite import plan

    if write_gb_s_per_node is None:
        write_gb_s_per_node = plan.CKPT_WRITE_GB_S_PER_NODE
    margin_s = plan.GRACE_MARGIN_S if margin_s is None else margin_s
    if not write_gb_s_per_node > 0:
        raise LaunchError(
            f"--ckpt-write-gbps={write_gb_s_per_node} must be > 0 (GB/s one node writes to the "
            "run dir's filesystem); e.g. --ckpt-write-gbps 1"
        )
    _at_least("--grace-margin", margin_s, 0)
    if cfg is None:
        return plan.GRACE_FLOOR_S, "the floor: --no-check leaves no config to estimate from"
    peak = None
    if job.gpus_per_node:
        from megalite.devices import DEVICES, lookup_peak_tflops

        peak = lookup_peak_tflops(gpu)
        if peak is None:
            known = ", ".join(d.key for d in DEVICES)
            raise LaunchError(
                f"--gpu={gpu!r} is not in the device table ({known}); name one of them, or "
                "give --signal-grace"
            )
    grace = plan.preemption_grace(
        cfg, job.nodes, job.world_size, write_gb_s_per_node, margin_s, peak_tflops=peak
    )
    assumptions = f"{write_gb_s_per_node:g} GB/s written per node"
    assumptions += f", {gpu} at {100 * plan.GRACE_MFU:.0f}% MFU" if peak else ", no GPUs"
    return grace.seconds, f"estimated: {grace.summary()} ({assumptions})"


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise LaunchError(f"{flag}={value} must be >= {low}")


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalite-launch",
        description="Start megalite-train with torchrun on this node, or as a SLURM batch job. "
        "Arguments after `--` are Hydra overrides for megalite-train.",
    )
    sub = parser.add_subparsers(dest="mode", required=True)

    local = sub.add_parser("local", help="torchrun on this node")
    local.add_argument("--nproc", type=int, help="workers (default: the GPUs here, else 1)")
    local.add_argument("--max-restarts", type=int, default=3, help="elastic restarts (3)")
    local.add_argument(
        "--shutdown-timeout",
        type=int,
        default=120,
        help="seconds torchrun waits for workers to checkpoint after a signal (120)",
    )

    slurm = sub.add_parser("slurm", help="render an sbatch script and submit it")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU nodes (8)")
    slurm.add_argument("--nproc-per-node", type=int, help="workers per node (one per GPU)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per node (8 per GPU worker)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--job-name", default="megalite")
    slurm.add_argument("--output-dir", default="logs", help="SLURM log dir (logs)")
    slurm.add_argument("--run-dir", help="train.run_dir (runs/<job name>)")
    slurm.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job"
    )
    slurm.add_argument("--container-image", help="pyxis/enroot image, or an apptainer .sif")
    slurm.add_argument("--container-runtime", choices=CONTAINER_RUNTIMES)
    slurm.add_argument("--container-mounts", help="src[:dst],... (the submit dir)")
    slurm.add_argument(
        "--signal-grace",
        type=int,
        help="SIGUSR1 this many seconds before the time limit (default: estimated from the "
        "config: the step, the checkpoint write and --grace-margin, at least 120)",
    )
    slurm.add_argument(
        "--ckpt-write-gbps",
        type=float,
        help="write bandwidth of one node to the run dir's filesystem, GB/s, for the grace "
        "estimate (1.0: an NFS mount over 10 GbE; parallel filesystems often give 5-20)",
    )
    slurm.add_argument(
        "--grace-margin",
        type=int,
        help="seconds the grace estimate adds for the stop handshake, start-up and exit (60)",
    )
    slurm.add_argument(
        "--gpu",
        default="h100",
        help="GPU type of the nodes, for the step time in the grace estimate (h100)",
    )
    slurm.add_argument("--max-restarts", type=int, default=3, help="elastic restarts (3)")
    slurm.add_argument("--rdzv-port", type=int, help="c10d port (20000 + job id %% 10000)")
    slurm.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        dest="sbatch_args",
        metavar="OPTION",
        help="one more #SBATCH option, e.g. --sbatch-arg=--mem=0",
    )

    for p in (local, slurm):
        p.add_argument("--torchrun", help="torchrun executable (the one next to this Python)")
        p.add_argument("--dry-run", action="store_true", help="print, do not run or submit")
        p.add_argument(
            "--no-check", action="store_true", help="skip composing and checking the config"
        )
        p.add_argument("overrides", nargs="*", help="Hydra overrides for megalite-train")
    return parser


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local(args: argparse.Namespace) -> int:
    job = LocalJob(
        nproc=args.nproc if args.nproc is not None else max(1, _gpu_count()),
        max_restarts=args.max_restarts,
        shutdown_timeout=args.shutdown_timeout,
        torchrun=args.torchrun or default_torchrun(),
        overrides=args.overrides,
    )
    if not args.no_check:
        check_config(with_resume_default(job.overrides), job.nproc)
    env = local_env(job)
    cmd = local_command(job)
    if args.dry_run:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return 0
    exe = shutil.which(cmd[0])
    if exe is None:
        raise LaunchError(f"--torchrun={cmd[0]} is not an executable; give torchrun's path")
    sys.stdout.flush()
    os.execve(exe, cmd, {**os.environ, **env})  # signals now go straight to torchrun
    return 0  # not reached


def run_slurm(args: argparse.Namespace, argv: list[str]) -> int:
    job = SlurmJob(
        nodes=args.nodes,
        job_name=args.job_name,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        output_dir=args.output_dir,
        run_dir=args.run_dir,
        env=args.env,
        container_image=args.container_image,
        container_runtime=args.container_runtime,
        container_mounts=args.container_mounts,
        signal_grace=args.signal_grace,
        max_restarts=args.max_restarts,
        rdzv_port=args.rdzv_port,
        torchrun=args.torchrun,
        sbatch_args=args.sbatch_args,
        overrides=args.overrides,
    )
    cfg = None
    if not args.no_check:
        cfg = check_config(
            [*with_resume_default(job.overrides), f"train.run_dir={job.run_dir}"], job.world_size
        )
    if job.signal_grace is None:
        job.set_grace(*estimate_grace(job, cfg, args.ckpt_write_gbps, args.grace_margin, args.gpu))
    script = render_sbatch(job, argv)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    job_id, path = submit(job, script)
    log = Path(job.output_dir) / f"{job.job_name}-{job_id}.out"
    print(f"submitted {path} as job {job_id}; log: {log}", file=sys.stderr)
    print(f"SIGUSR1 {job.signal_grace} s before the time limit: {job.grace_note}", file=sys.stderr)
    print(job_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.overrides[:1] == ["--"]:
        args.overrides = args.overrides[1:]
    try:
        if args.mode == "local":
            return run_local(args)
        return run_slurm(args, argv)
    except LaunchError as e:
        print(f"megalite-launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
