"""`megalite-eval watch`: each wanted checkpoint evaluated once, rows in metrics.jsonl at their
steps, failures reported and retried once, checkpoints pruned by keep_last skipped with a
warning; started by the trainer as its own process, which training never waits for.

The unit tests drive a `Watcher` in-process with a stand-in eval; the runs (slow) start the
real process from the trainer and wait for it to exit (an event, no clock)."""

from __future__ import annotations

import gc
import io
import json
import shutil
from pathlib import Path

import pytest

from megalite.eval_config import HarnessConfig
from megalite.eval_watch import Watcher, WatchSettings
from megalite.metrics import format_line, read_metrics
from tests.conftest import REPO, compose, tiny_train_overrides

TASK_DIR = REPO / "tests" / "harness_tasks"


def fake_run(root: Path, steps: list[int]) -> Path:
    """A run dir with complete checkpoints (meta.json is what makes one complete)."""
    for step in steps:
        ckpt = root / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"step": step}))
    return root


def results(step: int) -> dict:
    """The parts of lm_eval's results dict the watcher reads."""
    return {
        "results": {"t": {"alias": "t", "acc,none": step / 100, "acc_stderr,none": 0.1}},
        "versions": {"t": 1},
        "n-shot": {"t": 0},
        "higher_is_better": {"t": {"acc": True}},
    }


class Evals:
    """A stand-in for the harness: records calls, fails the attempts it is told to."""

    def __init__(self, fail: set[tuple[int, int]] = frozenset(), on_call=None) -> None:
        self.calls: list[int] = []
        self.fail, self.on_call = fail, on_call

    def __call__(self, ckpt: Path, h: HarnessConfig) -> dict:
        step = int(ckpt.name.split("_")[1])
        self.calls.append(step)
        if self.on_call is not None:
            self.on_call(ckpt)
        if (step, self.calls.count(step)) in self.fail:
            raise RuntimeError(f"boom at {step}")
        return results(step)


def watcher(run: Path, evals: Evals, every: int = 4, final: int | None = None) -> Watcher:
    s = WatchSettings(HarnessConfig(tasks=["t"], every=every), final_step=final, plot=False)
    return Watcher(run, s, evaluate=evals, out=io.StringIO())


def harness_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "harness"]


def test_each_wanted_checkpoint_once_in_step_order(tmp_path):
    run = fake_run(tmp_path, [2, 4, 6, 8, 10])
    evals = Evals()
    w = watcher(run, evals, every=4, final=10)
    w.run_until(once=True)
    assert evals.calls == [4, 8, 10]  # multiples of every, and the final step
    rows = harness_rows(run)
    assert [r["step"] for r in rows] == [4, 8, 10]
    assert rows[0]["harness/t/acc"] == 0.04 and "harness/t/acc_stderr" not in rows[0]
    assert format_line(rows[0]).startswith("harness step      4 | t/acc 0.04")
    assert (run / "harness" / "step_00000008.json").is_file()
    assert "|t" in (run / "harness" / "step_00000008.md").read_text()
    # A new checkpoint later: only it is evaluated; a new watcher (a resumed run) redoes nothing.
    fake_run(run, [12])
    watcher(run, evals, every=4).run_until(once=True)
    assert evals.calls == [4, 8, 10, 12]
    assert [r["step"] for r in harness_rows(run)] == [4, 8, 10, 12]


def test_a_failed_eval_is_reported_and_retried_once(tmp_path):
    run = fake_run(tmp_path, [4, 8])
    evals = Evals(fail={(4, 1), (8, 1), (8, 2)})
    w = watcher(run, evals)
    w.run_until(once=True)
    assert evals.calls == [4, 4, 8, 8]
    rows = harness_rows(run)
    assert [(r["step"], "harness_error" in r) for r in rows] == [
        (4, True), (4, False), (8, True), (8, True),
    ]  # fmt: skip
    assert rows[0]["harness_error"] == "RuntimeError: boom at 4"
    assert w.status(4) == "done" and w.status(8) == "failed"
    assert "eval of step_00000008 failed (attempt 2): RuntimeError: boom at 8" in w.out.getvalue()
    w.run_until(once=True)  # a failed checkpoint is not tried a third time
    assert evals.calls == [4, 4, 8, 8]


def test_checkpoints_pruned_by_keep_last_are_skipped_with_a_warning(tmp_path):
    run = fake_run(tmp_path, [4, 12])  # 8 was pruned before the watcher saw it

    def prune(ckpt: Path) -> None:  # the trainer deletes step 4 while it is evaluated
        if ckpt.name.endswith("04"):
            shutil.rmtree(ckpt)

    evals = Evals(fail={(4, 1)}, on_call=prune)
    w = watcher(run, evals)
    w.run_until(once=True)
    assert evals.calls == [4, 12]  # no retry of a checkpoint that is gone
    assert {r["step"]: "harness_skipped" in r for r in harness_rows(run)} == {
        4: True, 8: True, 12: False,
    }  # fmt: skip
    log = w.out.getvalue()
    assert (
        "warning: checkpoint step_00000004 skipped: deleted (train.keep_last) while its eval" in log
    )
    assert "warning: checkpoint step_00000008 skipped: deleted (train.keep_last) before" in log


def test_a_row_lost_by_a_crash_is_appended_again_once(tmp_path):
    run = fake_run(tmp_path, [4])
    w = watcher(run, Evals())
    w.run_until(once=True)
    (run / "metrics.jsonl").write_text("")  # as if the watcher died before appending
    w2 = watcher(run, Evals())
    w2.run_until(once=True)
    w2.run_until(once=True)
    assert [r["step"] for r in harness_rows(run)] == [4]


# ------------------------------------------------------------------------ beside training
def _harness_overrides(tmp_path: Path, tiny_data: Path, **train) -> list[str]:
    return [
        *tiny_train_overrides(tiny_data, tmp_path / "run", **train),
        "eval.harness.tasks=[megalite_tiny_mc,megalite_tiny_rolling]",
        f"eval.harness.include_path={TASK_DIR}",
        "eval.harness.limit=3",
        "eval.harness.batch_size=4",
    ]


@pytest.mark.slow
def test_training_starts_a_watcher_that_writes_rows_at_the_right_steps(
    tiny_data, tmp_path, monkeypatch
):
    """A demo-sized run with eval.harness.every=4: checkpoints at 2, 4, 6; harness rows at 4 and
    at the final step 6, next to val loss and bits per byte; the plot beside the loss."""
    from megalite.bpb import bits_per_byte, data_token_bytes
    from megalite.data.loader import ValSet
    from megalite.trainer import Trainer

    monkeypatch.chdir(REPO)  # the task YAMLs' data_files are relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    cfg = compose(
        [*_harness_overrides(tmp_path, tiny_data, max_steps=6, ckpt_every=2, eval_every=2,
                             plot=True), "eval.harness.every=4"]
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    proc = trainer.eval_watcher.process
    gc.collect()
    assert proc.wait(timeout=900) == 0, (tmp_path / "run" / "harness" / "watch.log").read_text()
    run = tmp_path / "run"
    rows = harness_rows(run)
    assert [r["step"] for r in rows] == [4, 6], rows
    for r in rows:
        assert 0.0 <= r["harness/megalite_tiny_mc/acc"] <= 1.0
        assert r["harness/megalite_tiny_rolling/bits_per_byte"] > 0
    assert json.loads((run / "harness" / "step_00000006.json").read_text())["megalite"]["step"] == 6
    assert (run / "loss.png").is_file()
    # Bits per byte beside val loss: the loss over the bytes the val targets spell.
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    table = data_token_bytes(str(tiny_data), cfg.model.vocab_size)
    val = ValSet(cfg.data, 0, 1)
    try:
        batches = list(val.batches(cfg.train.micro_batch_size, cfg.train.eval_batches))
    finally:
        val.close()
    tokens = sum(y.numel() for _, y in batches)
    nbytes = sum(int(table[y].sum()) for _, y in batches)
    assert 1 < nbytes / tokens < 6  # a 512-token BPE spells a byte or more per token
    for r in evals:
        assert r["val_bpb"] == pytest.approx(bits_per_byte(r["val_loss"], tokens, nbytes))


@pytest.mark.slow
def test_a_failing_eval_never_interrupts_training(tiny_data, tmp_path, monkeypatch):
    """Every eval fails (its task's data file is missing): the run finishes normally, the
    failure is in metrics.jsonl and watch.log."""
    from megalite.trainer import Trainer

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    broken = (TASK_DIR / "megalite_tiny_mc.yaml").read_text().replace("mc.jsonl", "gone.jsonl")
    (tasks / "broken.yaml").write_text(broken.replace("task: megalite_tiny_mc", "task: broken"))
    cfg = compose(
        [*tiny_train_overrides(tiny_data, tmp_path / "run", max_steps=2, ckpt_every=2,
                               eval_every=2),
         "eval.harness.tasks=[broken]", f"eval.harness.include_path={tasks}",
         "eval.harness.every=2"]
    )  # fmt: skip
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["step"] == 2
    proc = trainer.eval_watcher.process
    gc.collect()
    assert proc.wait(timeout=900) == 0
    rows = harness_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 2]  # the first attempt and its one retry
    assert all(
        "dataset of harness task 'broken' cannot be loaded" in r["harness_error"] for r in rows
    )
    assert "failed (attempt 2)" in (tmp_path / "run" / "harness" / "watch.log").read_text()


def test_rows_go_to_a_wandb_run_of_their_own(tmp_path):
    from megalite.config import WandbConfig

    run = fake_run(tmp_path, [4, 8])
    s = WatchSettings(
        HarnessConfig(tasks=["t"], every=4), plot=False, run_name="demo",
        wandb=WandbConfig(mode="offline", project="p"),
    )  # fmt: skip
    w = Watcher(run, s, evaluate=Evals(), out=io.StringIO())
    w.run_until(once=True)
    wb = w._wandb
    assert wb.name == "demo-harness" and wb.group == "demo"
    assert wb.summary["harness/t/acc"] == 0.08 and wb.summary["trainer/step"] == 8
    w.close()
    assert list((run / "harness" / "wandb").glob("offline-run-*"))


def test_started_by_hand_it_stops_once_the_run_has_finished(tmp_path):
    """Without the trainer's pipe, summary.json reaching train.max_steps ends the watch (after
    the final checkpoint is evaluated); the CLI takes the run's settings from config.yaml."""
    from megalite.eval_watch import main, settings_for

    run = fake_run(tmp_path / "run", [4, 6])
    (run / "summary.json").write_text(json.dumps({"step": 6}))
    evals = Evals()
    watcher(run, evals, every=4, final=6).run_until()
    assert evals.calls == [4, 6]
    cfg = compose(
        [*tiny_train_overrides(tmp_path, run, max_steps=6, ckpt_every=2),
         "eval.harness.every=4", "eval.harness.tasks=[a,b]"]
    )  # fmt: skip
    from omegaconf import OmegaConf

    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    s = settings_for(run, {"every": 2, "tasks": None})
    assert (s.harness.tasks, s.harness.every, s.final_step) == (["a", "b"], 2, 6)
    assert main([str(tmp_path / "nope")]) == 2
