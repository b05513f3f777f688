"""megalite-scale end to end on tiny runs (fp32, the tests' 512-token dataset): plan -> run,
with one run killed (SIGKILL at its last step, by the MEGALITE_FAULT failpoint) while the others
finish -> run again, which skips the finished runs and resumes the killed one from its half-way
checkpoint -> results.csv -> fit -> recommend with megalite-plan's layout. Then the same grid as
a SLURM job array on the test cluster (tests/launch/slurm_cluster.py)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, data_overrides, run_cli
from tests.launch.procs import wait_for
from tests.launch.slurm_cluster import SlurmCluster, missing_binaries
from tests.streaming_tmpdir import private_tmpdir  # noqa: F401  (autouse here)

SCALE = str(BIN / "megalite-scale")


def plan(tiny_data: Path, out: Path) -> list[dict[str, str]]:
    res = run_cli(
        [
            SCALE, "plan", "--budgets", "3e8,6e8", "--sizes", "3", "--min-steps", "3",
            "--out", str(out), *data_overrides(tiny_data), "parallel=single",
            "train.precision=fp32", "train.micro_batch_size=4", "train.eval_batches=2",
            "train.plot=false",
        ]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with open(out / "grid.csv", newline="") as f:
        return list(csv.DictReader(f))


def results(grid: Path) -> dict[str, dict[str, str]]:
    with open(grid / "results.csv", newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_run_survives_a_killed_run_resumes_it_then_fit_and_recommend(tiny_data, tmp_path):
    grid = tmp_path / "grid"
    rows = plan(tiny_data, grid)
    longest = max(rows, key=lambda r: int(r["steps"]))
    steps = int(longest["steps"])
    assert sum(int(r["steps"]) >= steps for r in rows) == 1  # only this run reaches that step

    first = run_cli([SCALE, "run", str(grid)], env={"MEGALITE_FAULT": f"kill_at=step@{steps}"})
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"{longest['run']}: failed" in first.stdout and "5 done, 1 failed" in first.stdout
    done = results(grid)
    assert sorted(done) == sorted(r["run"] for r in rows if r is not longest)
    killed = grid / "runs" / longest["run"]
    assert not (killed / "summary.json").exists()
    newest = (killed / "checkpoints" / "latest").read_text().strip()  # written half way on
    saved = int(newest.removeprefix("step_"))
    assert 0 < saved < steps and (killed / "checkpoints" / newest / "meta.json").is_file()
    finished_before = {r: (grid / "runs" / r / "summary.json").stat().st_mtime_ns for r in done}

    second = run_cli([SCALE, "run", str(grid)])
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("done, skipped") == 5 and "6 done, 0 failed" in second.stdout
    for r, mtime in finished_before.items():  # finished runs were not run again
        assert (grid / "runs" / r / "summary.json").stat().st_mtime_ns == mtime
    log = (grid / "logs" / f"{longest['run']}.log").read_text()
    # Resumed from the checkpoint the killed run left, not from scratch.
    assert f"resumed from {killed / 'checkpoints' / newest} at step {saved}" in log
    table = results(grid)
    assert len(table) == 6
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["step"] == steps
    for r in rows:
        row = table[r["run"]]
        assert int(row["params"]) == int(r["params"]) and int(row["tokens"]) == int(r["tokens"])
        assert 0 < float(row["loss"]) < 7  # val loss of a 512-token vocabulary: below ln 512

    fit = run_cli([SCALE, "fit", str(grid / "results.csv"), "--out", str(grid / "fit"),
                   "--bootstrap", "20"])  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    fitted = json.loads((grid / "fit" / "fit.json").read_text())
    assert fitted["points"] == 6 and len(fitted["budgets"]) == 2

    rec = run_cli(
        [SCALE, "recommend", str(grid / "fit"), "--budget", "1e10", "--gpus", "8", "--gpu",
         "h100", *data_overrides(tiny_data)]
    )  # fmt: skip
    assert rec.returncode == 0, rec.stderr
    assert "N_opt" in rec.stdout and "nearest llama shape" in rec.stdout
    assert "memory per rank" in rec.stdout and "wall time" in rec.stdout  # megalite-plan
    from megalite.compose import compose_config

    assert (grid / "fit" / "experiment" / "recommended.yaml").is_file()
    cfg = compose_config([f"hydra.searchpath=[file://{grid / 'fit'}]", "experiment=recommended"])
    assert cfg.parallel.strategy == "fsdp" and cfg.model.vocab_size == 512
    assert f"dim {cfg.model.dim}, {cfg.model.n_layers} layers" in rec.stdout


# ----------------------------------------------------------------------------------- SLURM
@pytest.fixture
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM tools are missing ({', '.join(missing)})")
    # A short path: munged's socket lives under it, and a socket path has at most 107 bytes.
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_job_array_trains_every_unfinished_run(slurm, tiny_data, tmp_path):
    grid = tmp_path / "grid"
    rows = plan(tiny_data, grid)
    res = run_cli(
        [SCALE, "run", str(grid), "--slurm", "--nodes", "1", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "20"],
        env={"SLURM_CONF": str(slurm.conf)},
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout

    def queue_empty() -> bool:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=slurm.env
        )
        return out.returncode == 0 and not out.stdout.strip()

    wait_for(queue_empty, 600, f"job array {job_id} to finish", interval=1.0)
    col = run_cli([SCALE, "collect", str(grid)])
    logs = "\n".join(p.read_text()[-2000:] for p in (grid / "slurm" / "logs").glob("*.out"))
    assert f"{len(rows)} runs: {len(rows)} done" in col.stdout, col.stdout + logs
    assert len(results(grid)) == len(rows)
    assert len(list((grid / "slurm" / "logs").glob("*.out"))) == len(rows)  # one per task
