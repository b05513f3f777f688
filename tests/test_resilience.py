"""Faults: NaN and spiking losses, kill -9 during a checkpoint save and at random steps, a hung
step, preemption signals, secrets. Real processes are killed with real signals; faults inside a
process come from megalite.resilience's failpoints (MEGALITE_FAULT)."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megalite import checkpoint
from megalite.metrics import read_metrics
from megalite.rundir import RunDir
from tests.conftest import BIN, REPO, compose, tiny_train_overrides

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _fingerprint():
    """Every step logs the fingerprint of the tokens it consumed (a debug switch: production
    steps skip it), so resumes can be checked sample for sample."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGALITE_DEBUG", "fingerprint")
        yield


def overrides(data: Path, run: Path, **train) -> list[str]:
    base = dict(max_steps=STEPS, eval_every=0, ckpt_every=2, keep_last=10)
    return tiny_train_overrides(data, run, **{**base, **train})


def train(args: list[str], fault: str | None = None, monkeypatch=None) -> dict:
    from megalite.trainer import Trainer

    if fault:
        monkeypatch.setenv("MEGALITE_FAULT", fault)
    try:
        return Trainer(compose(args)).fit()
    finally:
        if fault:
            monkeypatch.delenv("MEGALITE_FAULT")
        gc.collect()


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def by_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run)}


def spawn(args: list[str], fault: str | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ)
    if fault:
        env["MEGALITE_FAULT"] = fault
    return subprocess.Popen(
        [str(BIN / "megalite-train"), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted reference run (and a longer one for data fingerprints)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    from megalite.trainer import Trainer

    Trainer(compose(overrides(tiny_data, run))).fit()
    gc.collect()
    return run


# ----------------------------------------------------------------------------- loss guard
def load_weights(path: Path, data: Path) -> dict[str, torch.Tensor]:
    from megalite.model.transformer import build_model

    cfg = compose(overrides(data, path.parent))
    model = build_model(cfg.model)
    checkpoint.load_model_weights(path, model, cfg.model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_nonfinite_step_is_skipped_on_every_rank_and_counted(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(overrides(tiny_data, run, ckpt_every=1), "nan_at=3", monkeypatch)
    recs = by_step(run)
    assert recs[3]["loss"] != recs[3]["loss"]  # NaN, logged as such
    assert all(recs[s]["skipped_steps"] == (0 if s < 3 else 1) for s in recs)
    assert all(recs[s]["loss"] == recs[s]["loss"] for s in recs if s != 3)
    ckpts = run / "checkpoints"
    w2, w3, w4 = (load_weights(ckpts / f"step_{s:08d}", tiny_data) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3's update was not applied
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4's was


def test_bad_steps_in_a_row_roll_back_and_skip_the_offending_batches(
    tiny_data, tmp_path, straight, monkeypatch
):
    """Attempts 4, 5, 6 are NaN with max_bad_steps=3: after the third the run restores the
    step-3 checkpoint and goes on from the data reached, so the new step 4 trains on the batch
    the uninterrupted run used at step 7."""
    run = tmp_path / "run"
    longer = tmp_path / "longer"
    train(overrides(tiny_data, longer, max_steps=STEPS + 3, ckpt_every=0))
    train(overrides(tiny_data, run, ckpt_every=3), "nan_at=4:5:6", monkeypatch)
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    crc_ref = {r["step"]: r["data_crc"] for r in records(longer)}
    after = recs[5:]
    assert [r["data_crc"] for r in after] == [crc_ref[s + 3] for s in range(4, STEPS + 1)]
    assert after[-1]["rollbacks"] == 1 and after[-1]["skipped_steps"] == 3
    assert all(r["loss"] == r["loss"] for r in after)


def test_bad_steps_without_a_checkpoint_stop_with_a_clear_error(tiny_data, tmp_path, monkeypatch):
    from megalite.trainer import TrainingError

    with pytest.raises(
        TrainingError, match=r"3 bad steps in a row .* no checkpoint .* to roll back"
    ):
        train(overrides(tiny_data, tmp_path / "run", ckpt_every=0), "nan_at=1:2:3", monkeypatch)


@pytest.mark.parametrize("action", ["log", "skip"])
def test_loss_spike_is_detected(tiny_data, tmp_path, monkeypatch, action):
    run = tmp_path / "run"
    args = [
        *overrides(tiny_data, run, ckpt_every=0),
        "train.guard.spike_z=3",
        "train.guard.spike_window=4",
        f"train.guard.spike_action={action}",
    ]
    train(args, "spike_at=7", monkeypatch)
    recs = by_step(run)
    assert recs[7]["loss"] > 5 * recs[6]["loss"]
    assert recs[STEPS]["skipped_steps"] == (1 if action == "skip" else 0)


# ------------------------------------------------------------------- atomic checkpoints
SAVE_POINTS = [
    "save_after_weights",
    "save_before_meta",
    "save_before_rename",
    "save_before_latest",
    "save_before_prune",
]


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill_during_save_leaves_a_loadable_checkpoint(tiny_data, tmp_path, straight, point):
    """SIGKILL inside the step-4 save: the newest complete checkpoint is step 2 (or step 4 once
    the rename happened), it loads, and resuming reproduces the uninterrupted losses."""
    run = tmp_path / "run"
    proc = spawn(overrides(tiny_data, run), fault=f"kill_at={point}@4")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    newest = RunDir(run).newest_checkpoint()
    renamed = SAVE_POINTS.index(point) >= SAVE_POINTS.index("save_before_latest")
    assert newest is not None and newest.name == ("step_00000004" if renamed else "step_00000002")
    train(overrides(tiny_data, run, resume="auto"))
    got, ref = by_step(run), by_step(straight)
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    assert not list((run / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------ kill -9 at random steps
def wait_for_failpoint(proc: subprocess.Popen, run: Path) -> int:
    """Waits (an event, not a deadline) until the process blocks at its `wait_at_step` point;
    returns that step. The 300 s cap is only a safety net for a broken run."""
    marker = run / "FAILPOINT_WAITING"
    for _ in range(30000):
        if marker.exists() and marker.read_text().endswith("\n"):
            return int(marker.read_text())
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the failpoint:\n{err[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("the run never reached its failpoint")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_step_then_resume_is_exact(tiny_data, tmp_path, straight, seed):
    """A real SIGKILL from outside, at a random step the test chose (the run blocks at the start
    of that step until killed); resume=auto reproduces the uninterrupted losses bit for bit, and
    every step consumes the same tokens (data_crc), so every sample is seen exactly once."""
    kill_at = random.Random(seed).randint(2, STEPS)
    run = tmp_path / "run"
    proc = spawn(overrides(tiny_data, run), fault=f"wait_at_step={kill_at}")
    assert wait_for_failpoint(proc, run) == kill_at
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == kill_at - 1
    train(overrides(tiny_data, run, resume="auto"))
    got, ref = by_step(run), by_step(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    assert [got[s]["data_crc"] for s in ref] == [ref[s]["data_crc"] for s in ref]


# --------------------------------------------------------------------- watchdog, signals
def test_hung_step_dumps_stacks_and_exits_nonzero(tiny_data, tmp_path):
    proc = spawn(
        [*overrides(tiny_data, tmp_path / "run"), "train.watchdog_s=5"], fault="hang_at_step=3"
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None)
    assert "Timeout (0:00:05)!" in err
    assert re.search(r"Thread 0x[0-9a-f]+ \(most recent call first\)", err)
    # The stack shows where it hung: the failpoint in megalite/resilience.py.
    assert re.search(r'resilience\.py", line \d+ in at\n', err), err[-3000:]


@pytest.mark.parametrize("at", [3, 4])
def test_sigusr1_checkpoints_and_exits_cleanly_for_requeue(tiny_data, tmp_path, straight, at):
    """SIGUSR1 during step `at`: the step finishes, a checkpoint of it is written (once: at
    step 4 the periodic checkpoint is that checkpoint), PREEMPTED is left, exit 0; resuming
    reproduces the uninterrupted run."""
    run = tmp_path / "run"
    proc = spawn(overrides(tiny_data, run, max_steps=STEPS), fault=f"wait_at_step={at}")
    wait_for_failpoint(proc, run)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    marker = json.loads((run / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR1" and marker["step"] == at
    assert RunDir(run).newest_checkpoint().name == f"step_{at:08d}"
    periodic = [line for line in out.splitlines() if line.startswith("checkpoint ")]
    assert periodic.count(f"checkpoint {run}/checkpoints/step_{at:08d}") == (at % 2 == 0)
    # Not saved a second time when the signal met the periodic checkpoint.
    assert ("SIGUSR1: newest checkpoint" if at % 2 == 0 else "SIGUSR1: checkpointed") in out
    train(overrides(tiny_data, run, resume="auto"))
    assert not (run / "PREEMPTED").exists()
    got, ref = by_step(run), by_step(straight)
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]


# ------------------------------------------------------------------------------ security
def test_no_eval_exec_or_unsafe_load_in_the_code():
    # builtin eval/exec only: a method such as `schedule.eval(...)` (pipelining) is not one
    pattern = re.compile(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|weights_only\s*=\s*False")
    offenders = []
    for root in ("megalite", "kernels"):
        for path in (REPO / root).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders
    text = (REPO / "megalite" / "checkpoint.py").read_text()
    assert "torch.load(rank_file, weights_only=True)" in text


def test_secrets_never_reach_logs_or_saved_configs(tiny_data, tmp_path, monkeypatch):
    secret = "megalite-test-secret-7f3a9c"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    train([*overrides(tiny_data, run, max_steps=2), "logging.wandb.mode=offline"])
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks
