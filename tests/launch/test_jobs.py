"""`megalite-launch eval-watch` and `megalite-launch prepare`: the jobs beside training. The
watcher job's script runs `megalite-eval watch` with the given options; bad input is one error
line before anything is written. (The prepare array on a real SLURM:
tests/data/test_slurm_prepare.py, which submits through megalite-launch.)"""

from __future__ import annotations

import re

import pytest

from megalite import launch


def test_eval_watch_dry_run_renders_the_watcher_job(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["eval-watch", str(run), "--gpus", "1", "--time", "2:00:00", "--partition", "eval"]
    argv += ["--dry-run", "--", "--tasks", "hellaswag,arc_easy", "--every", "1000"]
    assert launch.main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --time=2:00:00" in script and "#SBATCH --partition=eval" in script
    assert "--dependency" not in script and "until [" not in script
    last = script.strip().splitlines()[-1]
    assert last.endswith(
        f"-m megalite.evaluate watch {run} --tasks hellaswag,arc_easy --every 1000 --device cuda"
    )
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_eval_watch_after_the_training_job_waits_for_its_config(tmp_path, capsys):
    run = tmp_path / "not-yet"
    argv = ["eval-watch", str(run), "--after", "4242", "--dry-run", "--", "--device", "cpu"]
    assert launch.main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --dependency=after:4242" in script
    assert f"until [ -f {run}/config.yaml ]; do sleep 10; done" in script
    assert "--gres" not in script and script.count("--device") == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval-watch", "{tmp}/nope"], r"run dir '.*nope' does not exist; .* --after"),
        (["eval-watch", "{tmp}", "--after", "x"], r"--after='x' is not a job id"),
        (["eval-watch", "{tmp}", "--gpus", "-1"], r"--gpus"),
        (["eval-watch", "{tmp}", "--time", "soon"], r"--time"),
        (["prepare", "in", "--out", "o", "--executor", "local"], r"drop --executor"),
    ],
)
def test_bad_job_input_is_one_error_line(argv, match, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    argv = [a.replace("{tmp}", str(work)) for a in argv]
    assert launch.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("megalite-launch: error: ")
    assert re.search(match, err), err
    assert list(work.iterdir()) == []


def test_prepare_submits_prepare_as_a_slurm_array(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n" * 50)
    monkeypatch.chdir(tmp_path)
    argv = ["prepare", str(corpus), "--out", str(tmp_path / "out"), "--tasks", "3"]
    argv += ["--seq-len", "32", "--vocab-size", "512", "--time", "30", "--dry-run"]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2" in out and '--task "$SLURM_ARRAY_TASK_ID"' in out
    assert "--merge" in out


@pytest.mark.slow
def test_eval_watch_job_on_slurm_evaluates_each_checkpoint(slurm, tiny_data, tmp_path, monkeypatch):
    """A finished tiny run (checkpoints at 2 and 4); `megalite-launch eval-watch` submits the
    watcher to the real one-machine SLURM; the job evaluates both checkpoints with the local
    harness tasks, appends their rows to metrics.jsonl and exits once the run's last step is
    done (an event: the job's state, no clock)."""
    from megalite.trainer import Trainer
    from tests.conftest import BIN, REPO, compose, run_cli, tiny_train_overrides
    from tests.launch.procs import wait_for
    from tests.test_eval_watch import TASK_DIR, harness_rows

    run = tmp_path / "run"
    cfg = compose(
        [*tiny_train_overrides(tiny_data, run, max_steps=4, ckpt_every=2, eval_every=0),
         "eval.harness.tasks=[megalite_tiny_mc,megalite_tiny_rolling]",
         f"eval.harness.include_path={TASK_DIR}", "eval.harness.limit=3",
         "eval.harness.batch_size=4"]
    )  # fmt: skip
    Trainer(cfg).fit()
    assert harness_rows(run) == []  # eval.harness.every is 0: the trainer started no watcher
    logs = tmp_path / "logs"
    env = {
        "SLURM_CONF": str(slurm.conf),
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
    }
    res = run_cli(
        [str(BIN / "megalite-launch"), "eval-watch", str(run), "--cpus-per-task", "1",
         "--time", "10", "--output-dir", str(logs), "--", "--every", "2", "--poll-s", "1"],
        env=env, cwd=REPO, timeout=120,  # cwd: the task YAMLs' data files are repo-relative
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), res.stdout

    def finished() -> dict | None:
        job = slurm.job(job_id)
        return job if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    job = wait_for(finished, 900, f"watcher job {job_id}", interval=0.5)
    log = "\n".join(p.read_text()[-3000:] for p in logs.glob("*.out"))
    assert job["JobState"] == "COMPLETED", log
    rows = harness_rows(run)
    assert [r["step"] for r in rows] == [2, 4], (rows, log)
    assert all(0.0 <= r["harness/megalite_tiny_mc/acc"] <= 1.0 for r in rows)
    assert (logs / "megalite-eval.sbatch").is_file()
