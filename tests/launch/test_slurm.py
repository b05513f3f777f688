"""The rendered batch script on a real SLURM (slurmctld + two slurmd nodes on this machine, see
slurm_cluster.py): a 2-node job trains the tiny model on CPU with gloo and completes; SIGUSR1 to
the batch shell (what `#SBATCH --signal=B:USR1@<grace>` does before the time limit) is passed on
to the tasks on both nodes; SIGUSR1 to the job's steps makes it checkpoint, requeue itself and
resume; a worker killed with SIGKILL is restarted across both nodes, and a job in a
higher-priority partition preempts it (SIGTERM to its steps), after which it requeues and
resumes; the time-limit warning itself arrives from slurmctld's timer. Every resumed run is
compared step by step with the uninterrupted one (same fp32 losses, same data)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.launch.conftest import (
    CKPT_EVERY,
    FINGERPRINT,
    LAUNCH,
    STEPS,
    by_step,
    launch_overrides,
)
from tests.launch.procs import all_pids, cmdline, environ, last_step, wait_for
from tests.launch.slurm_cluster import SlurmCluster

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def submit(slurm: SlurmCluster, workdir: Path, name: str, overrides: list[str], **env: str) -> str:
    """`megalite-launch slurm` for the two test nodes (one CPU worker each); returns the job id.
    `env` reaches the job (sbatch passes the submitting environment on)."""
    res = run_cli(
        [
            LAUNCH, "slurm", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--time", "20", "--signal-grace", "60", "--job-name", name,
            "--output-dir", str(workdir / "logs"), "--", *overrides,
        ],
        env={"SLURM_CONF": str(slurm.conf), **FINGERPRINT, **env},
        cwd=workdir,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout
    return job_id


def wait_finished(slurm: SlurmCluster, job_id: str, timeout: float = 600) -> dict[str, str]:
    wait_for(
        lambda: slurm.job(job_id)["JobState"] in FINISHED,
        timeout,
        f"job {job_id} to finish",
        interval=0.5,
    )
    return slurm.job(job_id)


def job_log(workdir: Path, name: str, job_id: str) -> str:
    return (workdir / "logs" / f"{name}-{job_id}.out").read_text(errors="replace")


def preemption_marker(log: str) -> dict:
    m = re.search(r"preempted: (\{.*\}); requeueing job", log)
    assert m, log[-3000:]
    return json.loads(m.group(1))


def test_two_node_batch_job_trains_and_completes(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    job_id = submit(slurm, tmp_path, "complete", launch_overrides(tiny_data, run))
    info = wait_finished(slurm, job_id)
    log = job_log(tmp_path, "complete", job_id)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    # The c10d rendezvous ran at the first node's address (NodeAddr), one port per job.
    assert f"rendezvous 127.0.0.1:{20000 + int(job_id) % 10000}" in log
    assert sorted(by_step(run)) == list(range(1, STEPS + 1))
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not (run / "PREEMPTED").exists()


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_resumes_like_an_uninterrupted_run(
    slurm, tiny_data, tmp_path, reference
):
    """`scancel --signal=USR1 <job>` signals every job step and not the batch shell, which is
    what `#SBATCH --signal=USR1@<grace>` does before the time limit. The moment is the test's:
    rank 0 blocks at the start of step HOLD (a failpoint; rank 1 then waits for it in that step's
    first collective) until the signal arrives, so both ranks stop after step HOLD."""
    hold = 5
    run = tmp_path / "run"
    fault = f"wait_at_step={hold},fault_rank=0"
    job_id = submit(slurm, tmp_path, "usr1", launch_overrides(tiny_data, run), MEGALITE_FAULT=fault)
    wait_for((run / "FAILPOINT_WAITING").exists, 600, f"the job to hold at step {hold}")
    slurm.run(["scancel", "--signal=USR1", job_id])
    info = wait_finished(slurm, job_id)
    log = job_log(tmp_path, "usr1", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    marker = preemption_marker(log)
    k = marker["step"]
    assert marker["signal"] == "SIGUSR1" and k == hold
    # A signal that meets a periodic checkpoint reuses it instead of writing the step twice.
    what = "newest checkpoint" if k % CKPT_EVERY == 0 else "checkpointed"
    assert f"SIGUSR1: {what} {run}/checkpoints/step_{k:08d} at step {k}" in log
    assert f"resumed from {run}/checkpoints/step_{k:08d} at step {k}" in log
    assert "(restart 1)" in log  # the same job id ran the script again
    assert by_step(run) == reference


def node_workers(conf: Path, node: str) -> list[int]:
    """PIDs of the megalite-train workers of this cluster's job on `node`."""
    found = []
    for pid in all_pids():
        env = environ(pid)
        if (
            env.get("SLURM_CONF") == str(conf)
            and env.get("SLURMD_NODENAME") == node
            and "LOCAL_RANK" in env
            and "megalite.train" in cmdline(pid)
        ):
            found.append(pid)
    return found


@pytest.mark.slow
def test_worker_killed_restarts_across_nodes_then_preemption_requeues(
    slurm, tiny_data, tmp_path, reference
):
    """SIGKILL to the worker on n2: both torchrun agents restart their workers through the
    c10d rendezvous, and the new workers resume from the newest checkpoint. Then a job in the
    higher-priority partition preempts this one: SLURM sends SIGTERM to its steps, the trainer
    checkpoints within the grace time, the script requeues the job (the partition's preempt
    mode is CANCEL) and, once the other job is done, the run resumes and completes."""
    run = tmp_path / "run"
    job_id = submit(slurm, tmp_path, "faults", launch_overrides(tiny_data, run))
    wait_for(lambda: last_step(run) >= CKPT_EVERY + 2, 600, f"step {CKPT_EVERY + 2}")
    (victim,) = wait_for(lambda: node_workers(slurm.conf, "n2"), 30, "the worker on n2")
    os.kill(victim, signal.SIGKILL)
    resumed = re.compile(rf"resumed from {re.escape(str(run))}/checkpoints/step_(\d+) at step")
    m = wait_for(
        lambda: resumed.search(job_log(tmp_path, "faults", job_id)), 600, "the restarted group"
    )
    k = int(m.group(1))
    assert k >= CKPT_EVERY
    # The restarted workers are in their training loop (signal handlers installed).
    wait_for(lambda: last_step(run) >= k + 2, 600, f"step {k + 2}")
    urgent = slurm.run(
        ["sbatch", "--parsable", "--partition=urgent", "--nodes=2", f"--chdir={tmp_path}",
         "--output=urgent.out", "--wrap", "echo urgent job ran"]
    ).stdout.strip()  # fmt: skip
    assert wait_finished(slurm, urgent)["JobState"] == "COMPLETED"
    info = wait_finished(slurm, job_id)
    log = job_log(tmp_path, "faults", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    marker = preemption_marker(log)
    assert marker["signal"] == "SIGTERM" and k + 2 <= marker["step"] < STEPS
    # One resume after the kill (the worker group restarted inside the job's first run) and
    # one after the requeue, from the preemption's checkpoint.
    assert [int(s) for s in resumed.findall(log)] == [k, marker["step"]]
    assert by_step(run) == reference


# Stands in for torchrun in the time-limit test (the warning can come 10-40 s into a job, too early
# for a trainer that is still starting): it does what the trainer does with SIGUSR1.
STAND_IN = """#!/bin/bash
for a in "$@"; do [[ $a == train.run_dir=* ]] && RUN_DIR=${a#train.run_dir=}; done
mkdir -p "$RUN_DIR"
[[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] && exit 0
on_usr1() {
  echo "task $SLURM_PROCID got SIGUSR1"
  [[ $SLURM_PROCID == 0 ]] && echo '{"step": 1, "signal": "SIGUSR1"}' > "$RUN_DIR/PREEMPTED"
  exit 0
}
trap on_usr1 USR1
echo "task $SLURM_PROCID started"
while true; do sleep 0.2; done
"""


def submit_stand_in(slurm: SlurmCluster, tmp_path: Path, name: str, *args: str) -> str:
    """The rendered script with the stand-in for torchrun on both nodes; returns the job id."""
    stand_in = tmp_path / "torchrun"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    res = run_cli(
        [
            LAUNCH, "slurm", "--nodes", "2", "--gpus-per-node", "0", *args, "--job-name", name,
            "--output-dir", str(tmp_path / "logs"), "--run-dir", str(tmp_path / "run"),
            "--torchrun", str(stand_in), "--no-check",
        ],
        env={"SLURM_CONF": str(slurm.conf)},
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_sigusr1_to_the_batch_shell_reaches_the_tasks_on_every_node(slurm, tmp_path):
    """`#SBATCH --signal=B:USR1@<grace>` signals only the batch shell; here `scancel --batch`
    does the same at once. The shell's trap passes it to srun, srun to the task on each node (the
    stand-in for torchrun), and after the marker the script requeues the job."""
    job_id = submit_stand_in(slurm, tmp_path, "batch_usr1")
    log_file = tmp_path / "logs" / f"batch_usr1-{job_id}.out"

    def started() -> bool:  # the stand-ins print this once their trap is set
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        return "task 0 started" in text and "task 1 started" in text

    wait_for(started, 120, "both tasks to start")
    slurm.run(["scancel", "--batch", "--signal=USR1", job_id])
    info = wait_finished(slurm, job_id, timeout=300)
    log = job_log(tmp_path, "batch_usr1", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "SIGUSR1: passing it to the job step" in log
    assert "task 0 got SIGUSR1" in log and "task 1 got SIGUSR1" in log
    assert preemption_marker(log)["signal"] == "SIGUSR1"


@pytest.mark.slow
def test_time_limit_warning_reaches_every_step_and_the_job_requeues(slurm, tmp_path):
    """The rendered `#SBATCH --signal=B:USR1@50` with a one-minute limit: slurmctld's own timer
    (checked every 30 s) sends SIGUSR1 to the batch shell, which passes it to the tasks on both
    nodes, and the script requeues the job. torchrun is replaced by a stand-in here."""
    job_id = submit_stand_in(slurm, tmp_path, "limit", "--time", "1", "--signal-grace", "50")
    info = wait_finished(slurm, job_id, timeout=300)
    log = job_log(tmp_path, "limit", job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "SIGUSR1: passing it to the job step" in log
    assert "task 0 got SIGUSR1" in log and "task 1 got SIGUSR1" in log
    assert preemption_marker(log)["signal"] == "SIGUSR1"
    assert "(restart 1)" in log
