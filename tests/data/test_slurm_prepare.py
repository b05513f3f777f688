"""`megalite-launch prepare --tasks 2` (`megalite-data prepare --executor slurm`) on a real SLURM
(slurmctld + two slurmd nodes on this machine, tests/launch/slurm_cluster.py): a job array of the two tasks, then the merge job
after it (afterok), gives the same dataset as one task prepared here."""

from __future__ import annotations

import re

import pytest

from megalite.data.prepare import PrepareOptions, prepare
from tests.conftest import BIN, run_cli
from tests.data.planted import build
from tests.data.test_tasks import same_dataset
from tests.launch.procs import wait_for
from tests.launch.slurm_cluster import SlurmCluster, missing_binaries

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
OPTIONS = "--seq-len 32 --vocab-size 512 --near-dedup --near-dedup-threshold 0.3".split()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM tools are missing ({', '.join(missing)}); see tests/launch")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_array_prepare_matches_one_task(slurm, tmp_path):
    corpus = build(tmp_path / "corpus", originals=60, copies=20).files[0].parent
    reference = tmp_path / "one"
    prepare(
        PrepareOptions(
            inputs=[str(corpus)], out=str(reference), seq_len=32, vocab_size=512,
            near_dedup=True, near_dedup_threshold=0.3, progress=False,
        )
    )  # fmt: skip
    out = tmp_path / "out"
    res = run_cli(
        [str(BIN / "megalite-launch"), "prepare", str(corpus), "--out", str(out), *OPTIONS,
         "--tasks", "2", "--workers", "1", "--time", "10"],
        env={"SLURM_CONF": str(slurm.conf)},
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = re.search(r"submitted tasks (\d+) \(array of 2\) and merge (\d+)", res.stdout)
    assert m, res.stdout
    array_id, merge_id = m.groups()
    logs = tmp_path / "out.logs"

    def merged() -> dict | None:
        for line in slurm.run(["scontrol", "show", "job", "-o", array_id]).stdout.splitlines():
            if "JobState=FAILED" in line or "JobState=CANCELLED" in line:
                raise AssertionError(f"a task failed: {line}\n{_logs(logs)}")
        job = slurm.job(merge_id)
        return job if job["JobState"] in FINISHED else None

    job = wait_for(merged, 600, f"merge job {merge_id}", interval=0.5)
    assert job["JobState"] == "COMPLETED", _logs(logs)
    same_dataset(reference, out)
    assert not (tmp_path / ".out.tasks").exists()  # the merge removed the task results
    assert sorted(p.name for p in logs.glob("*.sbatch")) == [
        "megalite-prepare-merge.sbatch",
        "megalite-prepare-tasks.sbatch",
    ]


def _logs(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.out")))
