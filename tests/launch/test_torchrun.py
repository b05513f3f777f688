"""torchrun on one node through `megalite-launch local`, with a real fault: one worker killed
with SIGKILL in the middle of the run. torchrun restarts the worker group, the new workers resume
from the newest complete checkpoint, and the run ends with every step logged once and the
losses and data of the uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from megalite.rundir import RunDir
from tests.conftest import REPO
from tests.launch.conftest import (
    CKPT_EVERY,
    FINGERPRINT,
    LAUNCH,
    STEPS,
    by_step,
    launch_overrides,
)
from tests.launch.procs import children, cmdline, environ, last_step, stop_process, wait_for


def workers(agent_pid: int) -> dict[int, int]:
    """local rank -> pid of torchrun's worker processes."""
    found = {}
    for pid in children(agent_pid):
        env = environ(pid)
        if "megalite.train" in cmdline(pid) and "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = pid
    return found


@pytest.mark.slow
def test_sigkill_of_a_worker_restarts_the_group_and_resumes_with_no_step_lost(
    tiny_data, tmp_path, reference
):
    run = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [LAUNCH, "local", "--nproc", "2", "--max-restarts", "1", "--",
             *launch_overrides(tiny_data, run)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, LOGLEVEL="INFO", **FINGERPRINT),  # torchrun logs restarts at INFO
        )  # fmt: skip
    try:
        # Mid-run: a checkpoint exists and steps past it were taken (they will be redone).
        checkpoint = wait_for(
            lambda: (
                (ck := RunDir(run).newest_checkpoint()) is not None
                and last_step(run) > int(ck.name[5:]) + 1
                and ck
            ),
            300,
            "a checkpoint and two more steps",
        )
        victim = wait_for(lambda: workers(proc.pid).get(1), 30, "worker with local rank 1")
        os.kill(victim, signal.SIGKILL)
        step_at_kill = last_step(run)
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        stop_process(proc)
    out = log_path.read_text()
    assert re.search(r"Worker group FAILED\. 1/1 attempts left; will restart worker group", out)
    # The new workers resumed from the newest checkpoint there was when the worker died.
    resumed = re.findall(rf"resumed from {re.escape(str(run))}/checkpoints/step_(\d+) at step", out)
    assert [int(k) for k in resumed] == [int(checkpoint.name[5:])]
    assert CKPT_EVERY <= int(resumed[0]) < step_at_kill < STEPS
    # Every step once (the redone ones replaced), with the uninterrupted run's losses and data.
    assert by_step(run) == reference
