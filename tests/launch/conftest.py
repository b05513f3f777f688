"""Launch-test fixtures: the training run every launch test uses, an uninterrupted reference of
it, a real SLURM cluster on this machine, and a private TMPDIR per test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, tiny_train_overrides
from tests.launch.procs import train_records
from tests.launch.slurm_cluster import SlurmCluster, missing_binaries
from tests.streaming_tmpdir import private_tmpdir  # noqa: F401  (autouse here)

STEPS = 100
CKPT_EVERY = 10
LAUNCH = str(BIN / "megalite-launch")
# Launched runs log each step's data fingerprint (`data_crc`, a debug check the trainer skips
# unless asked), so a resumed run can be compared with the uninterrupted one batch for batch.
# SLURM jobs get it too: sbatch passes the submitting environment on.
FINGERPRINT = {"MEGALITE_DEBUG": "fingerprint"}


def launch_overrides(data_dir: Path, run_dir: Path) -> list[str]:
    """Two ranks of DDP (micro-batch 2, global batch 4) in fp32, so a resumed run reproduces the
    uninterrupted one exactly. num_canonical_nodes=2 fixes the sample order, so one node with
    two workers and two nodes with one worker each read the same samples in the same steps."""
    return [
        *tiny_train_overrides(
            data_dir,
            run_dir,
            max_steps=STEPS,
            micro_batch_size=2,
            eval_every=0,
            ckpt_every=CKPT_EVERY,
        ),
        "parallel=ddp",
        "data.num_canonical_nodes=2",
    ]


def by_step(run_dir: Path) -> dict[int, tuple[float, int]]:
    """step -> (loss, data_crc); asserts that no step was logged twice."""
    recs = train_records(run_dir)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: (r["loss"], r["data_crc"]) for r in recs}


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory) -> dict[int, tuple[float, int]]:
    """The uninterrupted run: `megalite-launch local --nproc 2`, STEPS steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    res = subprocess.run(
        [LAUNCH, "local", "--nproc", "2", "--", *launch_overrides(tiny_data, run)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, **FINGERPRINT),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ref = by_step(run)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + two slurmd "nodes" (n1, n2; one CPU each) on 127.0.0.1, all state
    under a temp dir; every daemon is stopped by its PID afterwards."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM tools are missing ({', '.join(missing)}); apt-get install "
            "slurmctld slurmd slurm-client munge (.ci/run does)"
        )
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
