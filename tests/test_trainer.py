"""The loop end to end: smoke run, exact resume, accumulation, DDP under torchrun, bad input."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest

from megalite.config import ConfigError
from megalite.metrics import read_metrics
from tests.conftest import BIN, REPO, compose, run_cli, tiny_train_overrides


def train(overrides: list[str]) -> dict:
    from megalite.trainer import Trainer

    summary = Trainer(compose(overrides)).fit()
    gc.collect()
    return summary


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_smoke_run_writes_metrics_checkpoints_config_and_plot(tiny_data, tmp_path):
    run = tmp_path / "run"
    summary = train(
        tiny_train_overrides(
            tiny_data, run, precision="bf16", plot=True, max_steps=6, ckpt_every=3, keep_last=1
        )
    )
    recs = read_metrics(run / "metrics.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 7))
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
        "mem_gb",
    ):
        assert key in train_recs[0], key
    assert train_recs[-1]["tokens"] == 6 * 4 * 32
    assert all(math.isfinite(r["loss"]) and r["mfu"] > 0 for r in train_recs)
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    # keep_last=1: only the newest checkpoint survives, and `latest` names it.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run / "config.yaml").read_text().count("dim: 64") == 1
    assert (run / "loss.png").stat().st_size > 1000
    assert summary["step"] == 6 and summary["val_loss"] == evals[-1]["val_loss"]


def test_resume_reproduces_uninterrupted_losses_exactly(tiny_data, tmp_path):
    """fp32: 8 straight steps == 3 steps + stop + resume=auto + 5 steps, bit for bit (model,
    optimizer, schedule, RNG and data position all restored). Accumulation on, to cover it."""
    common = dict(max_steps=8, grad_accum_steps=2, micro_batch_size=2, ckpt_every=0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_train_overrides(tiny_data, straight, **common))
    train(tiny_train_overrides(tiny_data, split, stop_at_step=3, **common))
    assert max(losses(split)) == 3
    summary = train(tiny_train_overrides(tiny_data, split, resume="auto", **common))
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 9))  # records after the resumed step are not duplicated
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]
    val_a = [r for r in read_metrics(straight / "metrics.jsonl") if "val_loss" in r][-1]
    assert summary["val_loss"] == val_a["val_loss"]


def test_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    big = tmp_path / "big"
    acc = tmp_path / "acc"
    train(
        tiny_train_overrides(
            tiny_data,
            big,
            micro_batch_size=4,
            grad_accum_steps=1,
            max_steps=4,
            eval_every=0,
            ckpt_every=0,
        )
    )
    train(
        tiny_train_overrides(
            tiny_data,
            acc,
            micro_batch_size=2,
            grad_accum_steps=2,
            max_steps=4,
            eval_every=0,
            ckpt_every=0,
        )
    )
    a, b = losses(big), losses(acc)
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_fresh_run_refuses_a_used_run_dir(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_overrides(tiny_data, run, max_steps=2, eval_every=0))
    before = (run / "metrics.jsonl").read_text()
    from megalite.trainer import Trainer

    with pytest.raises(
        ConfigError,
        match=r"already holds a run \(checkpoint step_00000002\); pass train.resume=auto",
    ):
        Trainer(compose(tiny_train_overrides(tiny_data, run, max_steps=2)))
    assert (run / "metrics.jsonl").read_text() == before


def _cli_error(args: list[str], cwd: Path) -> str:
    res = run_cli([str(BIN / "megalite-train"), *args], cwd=cwd, timeout=300)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megalite-train: error: "), res.stderr
    return lines[0]


def test_bad_input_gets_one_clear_error_before_training(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = tiny_train_overrides(tiny_data, run)
    msg = _cli_error([*base, f"data.dir={tmp_path / 'missing'}"], tmp_path)
    assert "does not exist; prepare it first: `megalite-data prepare" in msg
    msg = _cli_error([*base, "train.global_batch_size=7"], tmp_path)
    assert "train.global_batch_size=7 does not equal train.micro_batch_size=4" in msg
    msg = _cli_error([*base, "model.n_kv_heads=3"], tmp_path)
    assert "model.n_heads=4 is not divisible by model.n_kv_heads=3" in msg
    assert not run.exists()  # nothing was started or written
    # A checkpoint dir from a different model shape.
    train(tiny_train_overrides(tiny_data, run, max_steps=1, eval_every=0))
    msg = _cli_error([*base, "model.dim=96", "model.n_heads=4", "train.resume=auto"], tmp_path)
    assert "different model shape (model.dim: checkpoint 64, config 96)" in msg


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    res = run_cli(
        [
            str(BIN / "megalite-data"),
            "prepare",
            str(tmp_path / "empty.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert res.returncode == 2 and "hold no text" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.world_size(2)
def test_ddp_under_torchrun_matches_single_process(tiny_data, tmp_path):
    """The same entry point under `launch/torchrun.sh` with 2 processes (gloo) trains the same
    model as one process over the same global batch: fp32 losses within 1e-5 relative."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = dict(max_steps=6, eval_every=3, ckpt_every=3)
    train(tiny_train_overrides(tiny_data, single, micro_batch_size=4, **common))
    res = run_cli(
        [
            str(REPO / "launch" / "torchrun.sh"),
            *tiny_train_overrides(tiny_data, ddp, micro_batch_size=2, **common),
            "parallel=ddp",
        ],
        env={"NPROC": "2", "TORCHRUN": str(BIN / "torchrun")},
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])
    va = [r["val_loss"] for r in read_metrics(single / "metrics.jsonl") if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(ddp / "metrics.jsonl") if "val_loss" in r]
    assert vb == pytest.approx(va, rel=1e-5)
    meta = json.loads((ddp / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
