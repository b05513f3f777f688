"""`megalite-launch` without a cluster: the torchrun command of `local`, the batch script of
`slurm` (every option, what is left out, shell quoting), the script's own logic run under bash
with recording stand-ins for srun and scontrol, and the errors for bad options."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from megalite import launch, launch_slurm
from tests.conftest import REPO, run_cli
from tests.launch.conftest import LAUNCH
from tests.launch.procs import wait_for

TORCHRUN_FLAGS = [
    "--standalone",
    "--nproc-per-node=2",
    "--max-restarts=3",
    "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "--shutdown-timeout=120",
    "-m",
    "megalite.train",
]


def dry_run(mode: str, *args: str, env: dict | None = None) -> str:
    res = run_cli([LAUNCH, mode, "--dry-run", *args], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ------------------------------------------------------------------------------------- local
def test_local_dry_run_prints_the_torchrun_command_with_resume_auto_first():
    out = dry_run("local", "--nproc", "2", "--", "parallel=ddp", "train.max_steps=5")
    words = shlex.split(out)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in words
    i = next(i for i, w in enumerate(words) if w.endswith("torchrun"))
    assert words[i + 1 :] == [
        *TORCHRUN_FLAGS,
        "train.resume=auto",
        "parallel=ddp",
        "train.max_steps=5",
    ]


def test_torchrun_sh_runs_the_same_command_as_launch_local():
    """launch/torchrun.sh (hand-editable) and `megalite-launch local` must not drift apart:
    with TORCHRUN=echo the script prints the arguments it would give torchrun."""
    overrides = ["parallel=ddp", "train.run_dir=runs/x y"]
    res = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), *overrides],
        capture_output=True,
        text=True,
        env=dict(os.environ, NPROC="2", TORCHRUN="echo"),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    script_args = res.stdout.split()
    cmd = launch.local_command(launch.LocalJob(nproc=2, torchrun="echo", overrides=overrides))
    assert script_args == " ".join(cmd[1:]).split()


def test_launch_local_runs_its_command_with_exec(tmp_path):
    """Not a dry run: the process becomes the torchrun command (a stand-in records its argv and
    environment), so signals sent to the launcher reach torchrun itself."""
    fake = tmp_path / "torchrun"
    fake.write_text(
        '#!/bin/sh\necho "pid=$$ omp=$OMP_NUM_THREADS store=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE args=$*"\n'
    )
    fake.chmod(0o755)
    proc = subprocess.Popen(
        [LAUNCH, "local", "--nproc", "2", "--torchrun", str(fake), "--no-check", "--", "a=1"],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.startswith(f"pid={proc.pid} ")  # exec'd: same process
    assert "store=1" in out and "omp=" in out and "omp= " not in out
    assert out.rstrip().endswith("-m megalite.train train.resume=auto a=1")


# ------------------------------------------------------------------------------------- slurm
FULL = [
    "slurm",
    "--nodes",
    "4",
    "--gpus-per-node",
    "8",
    "--cpus-per-task",
    "64",
    "--partition",
    "gpu",
    "--account",
    "proj42",
    "--qos",
    "high",
    "--time",
    "1-00:00:00",
    "--job-name",
    "llama3-8b",
    "--output-dir",
    "slurm-logs",
    "--run-dir",
    "runs/llama3 8b",
    "--env",
    "NCCL_DEBUG=INFO",
    "--env",
    "WANDB_PROJECT=my project",
    "--signal-grace",
    "300",
    "--max-restarts",
    "5",
    "--sbatch-arg=--exclusive",
    "--no-check",
    "--",
    "model=llama3_8b",
    "parallel=fsdp_tp",
    "optim.lr=3e-4",
]


def test_slurm_dry_run_renders_every_option():
    script = dry_run(*FULL)
    assert sbatch_lines(script) == [
        "--job-name=llama3-8b",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--time=1-00:00:00",
        "--output=slurm-logs/%x-%j.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@300",
        "--exclusive",
    ]
    assert "RUN_DIR=${RUN_DIR:-'runs/llama3 8b'}" in script
    assert "export NCCL_DEBUG=INFO" in script
    assert "export WANDB_PROJECT='my project'" in script
    assert "NPROC_PER_NODE=8" in script and "MAX_RESTARTS=5" in script
    assert "SHUTDOWN_TIMEOUT=300" in script
    assert "# The warning's lead, 300 s: given by --signal-grace" in script
    assert "OVERRIDES=(\n  model=llama3_8b\n  parallel=fsdp_tp\n  optim.lr=3e-4\n)" in script
    assert "CONTAINER_RUNTIME=none" in script
    # The head node comes from the allocation's node list; the c10d endpoint from it.
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in script
    assert '--rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"' in script
    assert "RDZV_PORT=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # The command that rendered it is recorded, without --dry-run.
    assert "#   megalite-launch slurm --nodes 4" in script and "--dry-run" not in script
    check_bash_syntax(script)


def test_slurm_dry_run_leaves_out_what_is_not_given():
    script = dry_run("slurm", "--nodes", "2", "--gpus-per-node", "0", "--no-check")
    lines = sbatch_lines(script)
    for absent in ("--gpus-per-node", "--partition", "--account", "--qos", "--time"):
        assert not any(line.startswith(absent) for line in lines), absent
    assert "--cpus-per-task=1" in lines  # one worker per CPU node by default
    assert "NPROC_PER_NODE=1" in script
    assert "RUN_DIR=${RUN_DIR:-runs/megalite}" in script
    assert "OVERRIDES=(\n)" in script
    assert "{{" not in script
    check_bash_syntax(script)


@pytest.mark.parametrize(
    ("image", "runtime", "expect"),
    [
        ("nvcr.io#nvidia/pytorch:25.01-py3", None, "pyxis"),
        ("/images/megalite.sif", None, "apptainer"),
        ("/images/megalite.sqsh", "pyxis", "pyxis"),
    ],
)
def test_slurm_container_image(image, runtime, expect):
    args = ["slurm", "--nodes", "1", "--no-check", "--container-image", image]
    args += ["--container-runtime", runtime] if runtime else []
    script = dry_run(*args)
    assert f"CONTAINER_RUNTIME={expect}" in script
    assert f"CONTAINER_IMAGE={shlex.quote(image)}" in script
    assert "TORCHRUN=torchrun" in script  # the image's torchrun, not this machine's
    assert "CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$SLURM_SUBMIT_DIR}" in script


def test_run_dir_from_the_overrides_and_train_resume_override_wins():
    script = dry_run("slurm", "--nodes", "1", "--no-check", "--", "train.run_dir=runs/a")
    assert "RUN_DIR=${RUN_DIR:-runs/a}" in script
    assert "OVERRIDES=(\n)" in script  # the script passes it, last
    cmd = launch.local_command(launch.LocalJob(nproc=1, overrides=["train.resume=none"]))
    assert cmd[-2:] == ["train.resume=auto", "train.resume=none"]  # Hydra keeps the last


# ------------------------------------------------- the rendered script, run with stand-ins
STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
if [[ $(basename "$0") == scontrol && $1 == show && $2 == hostnames ]]; then
  # A long node list: a reader that stops after the first line would SIGPIPE this writer.
  printf 'gpu-a17\\ngpu-a18\\n'
  seq -f 'gpu-b%g' 1 100000
elif [[ $(basename "$0") == scontrol && $1 == show && $2 == node ]]; then
  echo "NodeName=$3 Arch=x86_64 CoresPerSocket=32"
  echo "   NodeAddr=10.1.2.17 NodeHostName=$3 Version=22.05.8"
elif [[ $(basename "$0") == srun ]]; then
  for a in "$@"; do [[ $a == train.run_dir=* ]] && run_dir=${a#train.run_dir=}; done
  if [[ -n "${AWAIT_USR1:-}" ]]; then
    # What torchrun and the trainer do with SIGUSR1: checkpoint, leave the marker, exit non-zero.
    on_usr1() {
      echo "srun got SIGUSR1" >> "$CALLS"
      echo '{"step": 7, "signal": "SIGUSR1"}' > "$run_dir/PREEMPTED"
      exit 1
    }
    trap on_usr1 USR1
    touch "$AWAIT_USR1"
    while true; do sleep 0.1; done
  fi
  [[ -n "${MAKE_MARKER:-}" ]] && echo '{"step": 7, "signal": "SIGUSR1"}' > "$run_dir/PREEMPTED"
  exit "${SRUN_STATUS:-0}"
fi
"""


def script_env(tmp_path: Path, script: str, **env: str) -> tuple[Path, dict[str, str]]:
    """The script written to tmp_path, and an environment with stand-ins for srun and scontrol
    that record their calls in $CALLS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CALLS=str(calls),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_CPUS_PER_TASK="16",
        SLURM_SUBMIT_DIR=str(tmp_path),
        **env,
    )
    return path, full_env


def run_script(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[int, list[str]]:
    path, full_env = script_env(tmp_path, script, **env)
    res = subprocess.run(
        ["bash", str(path), *args], env=full_env, cwd=tmp_path, capture_output=True, timeout=60
    )
    return res.returncode, Path(full_env["CALLS"]).read_text().splitlines()


@pytest.fixture
def script(tmp_path) -> str:
    return dry_run(
        "slurm", "--nodes", "2", "--gpus-per-node", "2", "--no-check",
        "--run-dir", str(tmp_path / "run"), "--", "parallel=fsdp",
    )  # fmt: skip


def test_script_starts_one_torchrun_per_node_at_the_head_nodes_address(tmp_path, script):
    (tmp_path / "run").mkdir()
    status, calls = run_script(tmp_path, script, "train.max_steps=9")
    assert status == 0
    assert calls[:2] == ["scontrol show hostnames gpu-a[17-18]", "scontrol show node gpu-a17"]
    (srun,) = [c for c in calls if c.startswith("srun ")]
    words = srun.split()
    assert words[1:5] == [
        "--kill-on-bad-exit=1",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
    ]
    torchrun = words[5:]
    assert torchrun[0].endswith("torchrun")
    assert torchrun[1:10] == [
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=10.1.2.17:{20000 + 4242}",
        "--rdzv-id=4242",
        "--max-restarts=3",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=120",
        "-m",
    ]
    # Launched runs resume by default; sbatch's extra arguments come after the rendered
    # overrides; the run dir the script checks for a marker is the one the trainer gets.
    assert torchrun[10:] == [
        "megalite.train",
        "train.resume=auto",
        "parallel=fsdp",
        "train.max_steps=9",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    assert not any(c.startswith("scontrol requeue") for c in calls)


def test_script_requeues_only_after_a_preemption_checkpoint(tmp_path, script):
    (tmp_path / "run").mkdir()
    # torchrun exits non-zero after passing a signal on; the marker decides.
    status, calls = run_script(tmp_path, script, MAKE_MARKER="1", SRUN_STATUS="1")
    assert status == 0 and calls[-1] == "scontrol requeue 4242"
    # A marker from an earlier run of the job is removed before srun starts.
    (tmp_path / "run" / "PREEMPTED").write_text("{}")
    status, calls = run_script(tmp_path, script, SRUN_STATUS="3")
    assert status == 3 and not any(c.startswith("scontrol requeue") for c in calls)


def test_script_passes_sigusr1_from_slurm_on_to_the_job_step(tmp_path, script):
    """`#SBATCH --signal=B:USR1@<grace>` signals the batch shell only: its trap must pass the
    signal to srun (which passes it to the torchrun agents), keep waiting for srun, and then
    requeue on the marker the trainer leaves."""
    (tmp_path / "run").mkdir()
    started = tmp_path / "srun-started"
    path, env = script_env(tmp_path, script, AWAIT_USR1=str(started))
    proc = subprocess.Popen(
        ["bash", str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(started.exists, 60, "the job step to start")
        proc.send_signal(signal.SIGUSR1)  # what slurmctld does `grace` s before the time limit
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = Path(env["CALLS"]).read_text().splitlines()
    assert proc.returncode == 0, out.decode()
    assert "srun got SIGUSR1" in calls
    assert calls[-1] == "scontrol requeue 4242"
    assert b"SIGUSR1: passing it to the job step" in out


# ----------------------------------------------------------------------- the warning's lead
def grace_of(script: str) -> int:
    (line,) = [x for x in sbatch_lines(script) if x.startswith("--signal=")]
    m = re.fullmatch(r"--signal=B:USR1@(\d+)", line)
    assert m, line
    assert f"SHUTDOWN_TIMEOUT={m.group(1)}" in script  # torchrun waits as long for the workers
    return int(m.group(1))


def test_grace_is_estimated_from_the_step_and_the_checkpoint_write():
    """70B on 8 nodes: ~890 GB of checkpoint at 1 GB/s per node and a 4M-token step take far
    longer than SLURM's customary 120 s; a faster filesystem shortens the lead."""
    from megalite import plan
    from megalite.compose import compose_config
    from megalite.devices import lookup_peak_tflops

    overrides = [
        "model=llama3_70b", "parallel=fsdp_tp", "data.seq_len=8192",
        "train.micro_batch_size=1", "train.grad_accum_steps=64",
    ]  # fmt: skip
    args = ["slurm", "--nodes", "8", "--gpus-per-node", "8", "--time", "1-00:00:00"]
    slow = dry_run(*args, "--", *overrides)
    fast = dry_run(*args, "--ckpt-write-gbps", "10", "--", *overrides)
    cfg = compose_config(["train.resume=auto", *overrides])
    peak = lookup_peak_tflops("h100")  # --gpu's default
    want = plan.preemption_grace(cfg, 8, 64, 1.0, 60, peak_tflops=peak).seconds
    assert grace_of(slow) == want and want > 250
    assert "checkpoint 111 s (889 GB)" in slow  # 70.6e9 params x 12 bytes x 1.05
    assert 120 < grace_of(fast) < want - 90
    check_bash_syntax(slow)


def test_grace_has_a_floor_and_must_fit_in_the_time_limit():
    # A tiny model saves in no time: SLURM's customary 120 s; so does --no-check (no config).
    tiny = [
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--",
        "model.dim=64",
        "model.n_heads=4",
    ]
    assert grace_of(dry_run(*tiny)) == 120
    assert grace_of(dry_run("slurm", "--nodes", "1", "--no-check")) == 120
    res = run_cli(
        [LAUNCH, "slurm", "--dry-run", "--nodes", "8", "--time", "3", "--",
         "model=llama3_70b", "parallel=fsdp_tp", "data.seq_len=8192"],
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "is not shorter than --time=3 (180 s)" in res.stderr
    assert "give a shorter --signal-grace or raise --time" in res.stderr


def check_bash_syntax(script: str) -> None:
    res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["slurm", "--nodes", "0"], "--nodes=0 must be >= 1"),
        (["slurm", "--nodes", "1", "--time", "1h"], "--time='1h' is not a SLURM time limit"),
        (
            ["slurm", "--nodes", "1", "--time", "00:02:00", "--signal-grace", "120"],
            "--signal-grace=120 s is not shorter than --time=00:02:00 (120 s)",
        ),
        (["slurm", "--nodes", "1", "--job-name", "my job"], "--job-name='my job' must be"),
        (["slurm", "--nodes", "1", "--env", "NCCL_DEBUG"], "--env 'NCCL_DEBUG' is not KEY=VALUE"),
        (
            ["slurm", "--nodes", "1", "--gpus-per-node", "4", "--nproc-per-node", "8"],
            "--nproc-per-node=8 is more than --gpus-per-node=4",
        ),
        (
            ["slurm", "--nodes", "1", "--container-runtime", "apptainer"],
            "--container-runtime=apptainer needs --container-image",
        ),
        (
            ["slurm", "--nodes", "1", "--run-dir", "a", "--", "train.run_dir=b"],
            "--run-dir=a and the override train.run_dir=b disagree",
        ),
        (["local", "--nproc", "0"], "--nproc=0 must be >= 1"),
        (
            ["slurm", "--nodes", "1", "--ckpt-write-gbps", "0"],
            "--ckpt-write-gbps=0.0 must be > 0",
        ),
        (["slurm", "--nodes", "1", "--signal-grace", "70000"], "exceeds SLURM's maximum"),
    ],
)
def test_bad_options_name_the_flag_the_value_and_the_fix(args, message):
    res = run_cli([LAUNCH, args[0], "--dry-run", "--no-check", *args[1:]], timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("megalite-launch: error: ")
    assert message in res.stderr


def test_config_is_checked_against_the_world_size_before_launching():
    """nodes x processes per node is the world size megalite-train will see: a config that
    cannot run at it fails here, before the queue wait."""
    res = run_cli(
        [LAUNCH, "slurm", "--dry-run", "--nodes", "3", "--gpus-per-node", "2",
         "--", "parallel=fsdp_tp", "parallel.tp=4"],
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "world size 6" in res.stderr and "--no-check" in res.stderr
    res = run_cli([LAUNCH, "local", "--dry-run", "--nproc", "2", "--", "train.max_stepz=3"])
    assert res.returncode == 2
    assert "max_stepz" in res.stderr


def test_submit_without_sbatch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    job = launch_slurm.SlurmJob(nodes=1, output_dir=str(tmp_path / "logs"))
    with pytest.raises(launch.LaunchError, match=r"sbatch is not on PATH.*--dry-run"):
        launch_slurm.submit(job, "#!/bin/bash\n")


def test_time_limits_in_every_slurm_format():
    assert launch_slurm.time_limit_seconds("90") == 90 * 60
    assert launch_slurm.time_limit_seconds("10:30") == 10 * 60 + 30
    assert launch_slurm.time_limit_seconds("02:00:00") == 7200
    assert launch_slurm.time_limit_seconds("1-12") == 86400 + 12 * 3600
    assert launch_slurm.time_limit_seconds("1-00:30") == 86400 + 1800
    assert launch_slurm.time_limit_seconds("2-01:00:05") == 2 * 86400 + 3605
    assert launch_slurm.time_limit_seconds("UNLIMITED") is None
    assert re.search(
        "not a SLURM time limit", _error(lambda: launch_slurm.time_limit_seconds("1:2:3:4"))
    )


def _error(fn) -> str:
    with pytest.raises(launch.LaunchError) as e:
        fn()
    return str(e.value)
