"""`megalite-launch`: torchrun on this node, or a SLURM batch job rendered from a template.

    megalite-launch local --nproc 8 -- model=llama3_1b parallel=fsdp
    megalite-launch local --nproc 2 --dry-run -- parallel=ddp       # print the torchrun command
    megalite-launch slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --job-name llama3-8b -- model=llama3_8b parallel=fsdp_tp    # sbatch it, print the job id
    megalite-launch slurm ... --dry-run                             # print the batch script
    megalite-launch eval-watch runs/llama3-8b --gpus 1 --after 1234 -- --tasks hellaswag
    megalite-launch prepare corpus/ --out data/c4 --tasks 64 --partition cpu   # a job array

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

The batch job and its script (rendered from `launch/slurm.sbatch`) are megalite/launch_slurm.py.
`launch/torchrun.sh` is the hand-editable twin of `local`. The jobs beside training (the eval
watcher, the data preparation array) are megalite/launch_jobs.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megalite import launch_jobs
from megalite.errors import LaunchError, MegaliteError, cli_error
from megalite.launch_slurm import (
    CONTAINER_RUNTIMES,
    SlurmJob,
    at_least,
    default_torchrun,
    render_sbatch,
    submit,
)

if TYPE_CHECKING:
    from megalite.config import Config

# Signals torchrun catches and passes on to its workers. SIGUSR1 is SLURM's warning before the
# time limit; the trainer checkpoints and exits on SIGUSR1 and SIGTERM.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun hands every rendezvous round its own TCP store with this set; sharing one made
# elastic restarts fail with "Gloo connectFullMesh failed" (3 of 10 runs on CPU).
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def with_resume_default(overrides: list[str]) -> list[str]:
    # Hydra keeps the last value of a key given twice, so the user's train.resume wins.
    return ["train.resume=auto", *overrides]


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
        at_least("--nproc", self.nproc, 1)
        at_least("--max-restarts", self.max_restarts, 0)
        at_least("--shutdown-timeout", self.shutdown_timeout, 1)


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


# ------------------------------------------------------------------------------------ checking
def check_config(overrides: list[str], world_size: int) -> Config:
    """Composes the typed config megalite-train would build and checks it against the world
    size: unknown keys, wrong types, degrees and batch arithmetic fail before the launch."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megalite.compose import compose_config
    from megalite.config import ConfigError
    from megalite.demo_checks import demo_warnings
    from megalite.parallel.dims import ParallelDims, check_world_size

    try:
        cfg = compose_config(overrides)
        check_world_size(cfg, ParallelDims.from_config(cfg.parallel, world_size))
        for line in demo_warnings(cfg):  # legal, but not what a real run wants (demo_checks.py)
            print(f"megalite-launch: warning: {line}", file=sys.stderr)
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
    at_least("--grace-margin", margin_s, 0)
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


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalite-launch",
        description="Start megalite-train with torchrun on this node, or as a SLURM batch job "
        "(arguments after `--` are Hydra overrides for megalite-train); submit the eval watcher "
        "or a data preparation as SLURM jobs of their own.",
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
    slurm.add_argument(
        "--nodes", type=int, required=True, help="number of nodes (one torchrun agent each)"
    )
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

    launch_jobs.add_parsers(sub)  # eval-watch, prepare: jobs beside training

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
    try:
        if argv[:1] == ["prepare"]:  # every argument is megalite-data prepare's, --help included
            return launch_jobs.run_prepare(argparse.Namespace(prepare_args=argv[1:]))
        if argv[:1] == ["eval-watch"] and "--" in argv:  # the rest is megalite-eval watch's
            cut = argv.index("--")
            args = build_parser().parse_args(argv[:cut])
            args.watch_args = argv[cut + 1 :]
        else:
            args = build_parser().parse_args(argv)
        if args.mode == "eval-watch":
            return launch_jobs.run_eval_watch(args)
        if args.overrides[:1] == ["--"]:
            args.overrides = args.overrides[1:]
        if args.mode == "local":
            return run_local(args)
        return run_slurm(args, argv)
    except MegaliteError as e:
        return cli_error("megalite-launch", e)


if __name__ == "__main__":
    sys.exit(main())
