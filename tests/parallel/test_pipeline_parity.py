"""Pipeline parallelism trains the same model as one process over the same global batch.

Real gloo process groups: three torchrun jobs (2, 4 and 8 ranks) run every pipeline layout one
after another (tests/parallel/pipeline_driver.py); their per-step losses, gradient norms and
validation losses are compared with one single-process run of the same config. Every case uses
gradient accumulation (2 micro-batches, each split into 2 pipeline micro-batches) and a clipping
threshold below the gradient norm, so both run under every schedule. The model has 4 layers, so
the 2-stages-per-rank schedules (interleaved 1F1B, ZB-V) get one block per stage.

Tolerance: fp32, 1e-5 relative, the one tests/parallel/test_parity.py uses for every layout
(pipelining only moves where a sum happens; measured here: ~1e-7).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from megalite.metrics import read_metrics
from tests.conftest import REPO, compose, run_torchrun, tiny_train_overrides

STEPS = 4
FP32_RTOL = 1e-5
COMMON = dict(max_steps=STEPS, grad_accum_steps=2, eval_every=2, eval_batches=2, ckpt_every=0)
MODEL = ["model.n_layers=4", "optim.grad_clip=0.5"]
NAN_AT_2 = {"MEGALITE_FAULT": "nan_at=2"}


def overrides(data: Path, run: Path, micro: int, *extra: str, **train) -> list[str]:
    return [
        *tiny_train_overrides(data, run, micro_batch_size=micro, **{**COMMON, **train}),
        *MODEL,
        *extra,
    ]


def records(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def torchrun(n: int, cases: list[dict], tmp: Path) -> None:
    spec = tmp / f"cases_{n}.json"
    spec.write_text(json.dumps(cases))
    driver = str(REPO / "tests/parallel/pipeline_driver.py")
    res = run_torchrun(n, [driver, str(spec)], timeout=1200)
    (tmp / f"torchrun_{n}.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def single(data: Path, run: Path, *extra: str, env: dict | None = None, **train) -> None:
    from megalite.trainer import Trainer

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        Trainer(compose(overrides(data, run, 4, "parallel=single", *extra, **train))).fit()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


PP = ["parallel=pp"]
SCHEDULES = {
    "gpipe": [*PP, "parallel.pp_schedule=gpipe"],
    "1f1b": [*PP, "parallel.pp_schedule=1f1b"],
    "interleaved_1f1b": [
        *PP,
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_virtual_stages=2",
    ],
    "zbv": [*PP, "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Every multi-rank run, then the single-process references. Returns {name: run_dir}."""
    tmp = tmp_path_factory.mktemp("pipeline")
    r = {
        name: tmp / name
        for name in (
            *SCHEDULES,
            "guard",
            "pp_dp",
            "pp_tp",
            "pp_ddp",
            "pp_hsdp",
            "pp_dp_tp",
            "to_dp4",
            "to_single",
            "single",
            "single_guard",
        )
    }
    d = tiny_data

    def case(name, micro, *extra, env=None, **train):
        return {"overrides": overrides(d, r[name], micro, *extra, **train), "env": env or {}}

    logs = {}
    logs[2] = torchrun(
        2,
        [
            *(case(name, 4, *extra) for name, extra in SCHEDULES.items()),
            case("guard", 4, *SCHEDULES["1f1b"], env=NAN_AT_2),
        ],
        tmp,
    )
    step2 = r["pp_dp"] / "checkpoints" / "step_00000002"
    logs[4] = torchrun(
        4,
        [
            # pp=2 x FSDP over 2; its step-2 checkpoint is resumed at dp=4 and in one process.
            case("pp_dp", 2, *PP, ckpt_every=2),
            case("pp_tp", 4, "parallel=fsdp_tp", "parallel.tp=2", "parallel.pp=2"),
            # ddp's replication under pp: HSDP with shard groups of one rank.
            case("pp_ddp", 2, "parallel=ddp", "parallel.pp=2"),
            case("to_dp4", 1, "parallel=fsdp", resume=str(step2)),
        ],
        tmp,
    )
    logs[8] = torchrun(
        8,
        [
            case("pp_dp_tp", 2, "parallel=fsdp_tp", "parallel.tp=2", "parallel.pp=2"),
            # HSDP: 2 replicas x FSDP over 2, x pp 2: the same global batch without accumulation,
            # and one validation batch of 2 per data-parallel rank: the reference's 8 samples.
            case(
                "pp_hsdp",
                2,
                "parallel=hsdp",
                "parallel.dp_shard=2",
                "parallel.pp=2",
                grad_accum_steps=1,
                eval_batches=1,
            ),
        ],
        tmp,
    )
    single(d, r["single"])
    single(d, r["single_guard"], env=NAN_AT_2)
    single(d, r["to_single"], resume=str(step2))
    r["logs"] = logs
    return r


def assert_same(run: Path, ref: Path, first_step: int = 1) -> float:
    """Per-step losses, gradient norms and validation losses within FP32_RTOL of the reference
    (from `first_step` on: a resumed run logs only the steps it ran)."""
    worst = 0.0
    for key in ("loss", "grad_norm", "val_loss"):
        a = {s: v for s, v in records(ref, key).items() if s >= first_step}
        b = records(run, key)
        assert sorted(b) == sorted(a), f"{run.name} {key}: steps {sorted(b)} vs {sorted(a)}"
        assert a, f"{ref.name} has no {key}"
        for s in a:
            if math.isnan(a[s]):
                assert math.isnan(b[s]), f"{run.name} {key} step {s}: {b[s]} vs nan"
                continue
            worst = max(worst, abs(b[s] - a[s]) / abs(a[s]))
    assert worst <= FP32_RTOL, f"{run.name}: max relative difference {worst:.2e}"
    return worst


@pytest.mark.slow
@pytest.mark.world_size(2)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_schedule_matches_single_process(runs, schedule):
    assert_same(runs[schedule], runs["single"])


@pytest.mark.slow
@pytest.mark.world_size(8)
@pytest.mark.parametrize("name", ["pp_dp", "pp_tp", "pp_ddp", "pp_hsdp", "pp_dp_tp"])
def test_3d_layouts_match_single_process(runs, name):
    assert_same(runs[name], runs["single"])


@pytest.mark.slow
def test_split_printed_at_start_up(runs):
    out = runs["logs"][2].stdout
    assert "pipeline split (4 stages" in out  # interleaved_1f1b / zbv: 2 ranks x 2 stages
    assert "stage 0 (rank 0): embed + layer 0" in out
    # zbv's V: the last stage (the head) is on rank 0 too.
    assert "stage 3 (rank 0): layer 3 + head" in out


@pytest.mark.slow
def test_dcp_reshard_pp_dp_to_dp4_and_single(runs):
    """Saved at pp=2 x dp_shard=2, resumed (model + optimizer + data position) at dp_shard=4
    and in one process: steps 3-4 are those of the uninterrupted single-process run."""
    for name in ("to_dp4", "to_single"):
        assert_same(runs[name], runs["single"], first_step=3)


@pytest.mark.slow
def test_loss_guard_skips_the_poisoned_step(runs):
    """nan_at=2: the last stage's loss is NaN, the guard (on the all-reduced loss, the same on
    every rank) skips the update on every stage, and training goes on as one process does."""
    assert math.isnan(records(runs["guard"], "loss")[2])
    assert records(runs["guard"], "skipped_steps")[STEPS] == 1
    assert_same(runs["guard"], runs["single_guard"])


@pytest.mark.slow
def test_mfu_counts_every_rank(runs):
    """MFU divides by all ranks, pipeline ranks included: the bubble is idle time."""
    for rec in read_metrics(runs["1f1b"] / "metrics.jsonl"):
        if "mfu" in rec:
            assert rec["tokens_per_s_per_device"] == pytest.approx(rec["tokens_per_s"] / 2)
            assert rec["mfu"] > 0


@pytest.mark.slow
def test_pipeline_checkpoint_reads_as_a_plain_model(runs, tiny_data, tmp_path):
    """A pp=2 x dp=2 checkpoint is an ordinary one: load_for_inference (megalite-generate,
    megalite-eval) rebuilds the whole model, whose validation loss is the one the run
    measured; megalite-convert to-hf exports it."""
    import torch

    from megalite.checkpoint import load_for_inference
    from megalite.config import DataConfig
    from megalite.data.loader import ValSet
    from megalite.interop.cli import main as megalite_convert

    ckpt = runs["pp_dp"] / "checkpoints" / f"step_{STEPS:08d}"
    model, _ = load_for_inference(ckpt)
    val = ValSet(DataConfig(dir=str(tiny_data), seq_len=32), rank=0, world_size=1)
    with torch.no_grad():
        got = sum(model(x, y).item() for x, y in val.batches(4, 2)) / 2
    val.close()
    assert got == pytest.approx(records(runs["pp_dp"], "val_loss")[STEPS], rel=FP32_RTOL)
    assert megalite_convert(["to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
