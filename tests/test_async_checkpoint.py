"""Asynchronous checkpoints (train.ckpt_async, megalite/checkpoint_async.py): the same files and
losses as synchronous saves, kill -9 while a save is in flight, preemption, the process mode and
its entry-point guard, and the checks before start.

The stall a save costs the training loop, async against sync on a 100M+ model, is a benchmark:
benchmarks/bench_async_checkpoint.py.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalite import checkpoint
from megalite.metrics import read_metrics
from megalite.rundir import RunDir
from tests.conftest import BIN, REPO, compose, run_torchrun, tiny_train_overrides

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _fingerprint():
    """Every step logs the fingerprint of the tokens it consumed, so resumes are checked sample
    for sample (a debug switch: production steps skip it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGALITE_DEBUG", "fingerprint")
        yield


def overrides(data: Path, run: Path, mode: str, **train) -> list[str]:
    base = dict(max_steps=STEPS, eval_every=0, ckpt_every=2, keep_last=10, ckpt_async=mode)
    return [*tiny_train_overrides(data, run, **{**base, **train}), "parallel=single"]


def train(args: list[str]) -> dict:
    from megalite.trainer import Trainer

    try:
        return Trainer(compose(args)).fit()
    finally:
        gc.collect()


def by_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def weights(path: Path, data: Path) -> dict[str, torch.Tensor]:
    from megalite.model.transformer import build_model

    cfg = compose(overrides(data, path.parent, "none"))
    model = build_model(cfg.model)
    checkpoint.load_model_weights(path, model, cfg.model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sync_run(tiny_data, tmp_path_factory) -> Path:
    """The reference: synchronous saves every 2 steps, uninterrupted."""
    run = tmp_path_factory.mktemp("sync") / "run"
    train(overrides(tiny_data, run, "none"))
    return run


@pytest.fixture(scope="module")
def thread_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("thread") / "run"
    train(overrides(tiny_data, run, "thread"))
    return run


def test_async_saves_equal_sync_saves(tiny_data, sync_run, thread_run):
    """Training goes on while each save is written, yet the losses are bit-identical to
    synchronous saves, every checkpoint is committed (meta.json, no .tmp left), and each holds
    exactly the weights the synchronous one holds: the staged copy is the state of its step,
    not of a later one."""
    ref, got = by_step(sync_run), by_step(thread_run)
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    names = [p.name for p in RunDir(thread_run).complete_checkpoints()]
    assert names == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert not list((thread_run / "checkpoints").glob("*.tmp"))
    for name in names:
        a = weights(thread_run / "checkpoints" / name, tiny_data)
        b = weights(sync_run / "checkpoints" / name, tiny_data)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((thread_run / "checkpoints" / names[-1] / "meta.json").read_text())
    assert meta["step"] == 8


# ----------------------------------------------------------------- kill -9 mid-save
def spawn(args: list[str], fault: str) -> subprocess.Popen:
    import os

    env = dict(os.environ, MEGALITE_FAULT=fault)
    return subprocess.Popen(
        [str(BIN / "megalite-train"), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_hold(proc: subprocess.Popen, run: Path) -> str:
    """Waits (for the failpoint's file, not a deadline) until the save's writer is held; the
    5-minute cap is only a safety net for a broken run."""
    marker = run / "FAILPOINT_HOLDING"
    for _ in range(30000):
        if marker.exists() and marker.read_text().endswith("\n"):
            return marker.read_text().strip()
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the failpoint:\n{err[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("the run never reached its failpoint")


@pytest.mark.parametrize(
    "point",
    [
        # DCP's writer held before this rank's shards are written: nothing of step 4 on disk
        # but its trainer-state file.
        "async_save_writing",
        # Every DCP file of step 4 written and fsynced, .metadata too: only meta.json and the
        # rename are missing — the checkpoint still does not count.
        pytest.param("async_save_before_meta", marks=pytest.mark.slow),
    ],
)
def test_kill_9_during_an_in_flight_async_save_resumes_exactly(
    tiny_data, tmp_path, sync_run, point
):
    """The writer of the step-4 save blocks at a failpoint while training goes on; the test
    kills the process (SIGKILL) once the failpoint says it holds. The step-4 save is in flight
    (step_4.tmp, no step_4), the newest complete checkpoint is step 2, and resume=auto from it
    reproduces the uninterrupted losses bit for bit, sample for sample."""
    run = tmp_path / "run"
    proc = spawn(overrides(tiny_data, run, "thread"), fault=f"hold_at={point}@4")
    assert wait_for_hold(proc, run) == f"{point}@4"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()
    assert RunDir(run).newest_checkpoint().name == "step_00000002"
    train(overrides(tiny_data, run, "thread", resume="auto"))
    got, ref = by_step(run), by_step(sync_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    assert [got[s]["data_crc"] for s in ref] == [ref[s]["data_crc"] for s in ref]
    assert not list(ckpts.glob("*.tmp"))  # the dead save's staging dir was replaced


@pytest.mark.slow
def test_preemption_waits_for_the_in_flight_save_then_saves(tiny_data, tmp_path, sync_run):
    """SIGUSR1 during step 3, while the step-2 save may still be in flight: step 2 is committed
    first, then step 3 is saved and committed before the PREEMPTED marker names it; exit 0;
    resume reproduces the uninterrupted run."""
    run = tmp_path / "run"
    args = overrides(tiny_data, run, "thread")
    proc = spawn(args, fault="wait_at_step=3")
    marker = run / "FAILPOINT_WAITING"
    for _ in range(30000):  # the event: the run blocks at step 3 (safety cap only)
        if marker.exists() and marker.read_text().endswith("\n") or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    preempted = json.loads((run / "PREEMPTED").read_text())
    assert preempted["step"] == 3 and preempted["checkpoint"].endswith("step_00000003")
    assert [p.name for p in RunDir(run).complete_checkpoints()] == [
        "step_00000002",
        "step_00000003",
    ]
    train(overrides(tiny_data, run, "thread", resume="auto"))
    got, ref = by_step(run), by_step(sync_run)
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]


# ------------------------------------------------------------------------ process mode
@pytest.mark.slow
def test_process_mode_on_two_ranks_matches_sync(tiny_data, tmp_path):
    """2 gloo ranks, FSDP2: saves written by DCP's helper processes give the losses and the
    weights of synchronous saves (one torchrun job runs both)."""
    runs = {mode: tmp_path / mode for mode in ("none", "process")}
    cases = [
        [
            *tiny_train_overrides(
                tiny_data, runs[mode], max_steps=4, eval_every=0, ckpt_every=2, ckpt_async=mode
            ),
            "parallel=fsdp",
            "train.micro_batch_size=2",
        ]
        for mode in runs
    ]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    res = run_torchrun(2, [str(REPO / "tests/parallel/driver.py"), str(spec)], timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    ref, got = by_step(runs["none"]), by_step(runs["process"])
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    for step in (2, 4):
        name = f"step_{step:08d}"
        a = weights(runs["process"] / "checkpoints" / name, tiny_data)
        b = weights(runs["none"] / "checkpoints" / name, tiny_data)
        assert all(torch.equal(a[k], b[k]) for k in a), name


UNGUARDED = """
import multiprocessing as mp
from megalite.checkpoint_async import refuse_reimported_main

refuse_reimported_main()  # what Trainer() does first
# No `if __name__ == "__main__":` guard: a spawned helper re-runs this line too.
helper = mp.get_context("spawn").Process(target=print)
helper.start()
helper.join()
print("helper exit code", helper.exitcode)
"""


def test_an_unguarded_entry_script_gets_one_clear_error(tmp_path):
    """DCP's process mode spawns a helper, which re-imports the script that started training;
    without an entry-point guard the helper would start training again. The Trainer's first
    line refuses that with a message naming the script and the fix."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    res = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert "helper exit code 1" in res.stdout, res.stderr[-3000:]
    assert f"re-imported {script}" in res.stderr
    assert 'if __name__ == "__main__":' in res.stderr


# ------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["train.ckpt_async=process"], "single-process run has none: use train.ckpt_async=thread"),
        (["train.ckpt_async=thread", "parallel=zero2"], "DeepSpeed"),
    ],
)
def test_preflight_refuses_what_async_saves_cannot_do(tiny_data, tmp_path, extra, match):
    from megalite.preflight import PreflightError, preflight

    cfg = compose([*tiny_train_overrides(tiny_data, tmp_path / "run"), *extra])
    with pytest.raises(PreflightError, match=match):
        preflight(cfg, world_size=1)


def test_unknown_mode_fails_at_compose(tiny_data, tmp_path):
    from megalite.errors import ConfigError

    with pytest.raises(ConfigError, match="train.ckpt_async='async' is not one of none, thread"):
        compose([*tiny_train_overrides(tiny_data, tmp_path / "run"), "train.ckpt_async=async"])
