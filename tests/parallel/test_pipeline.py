"""Pipeline parallelism without a process group: the config checks (one clear error each, when
the config is built), the cost-balanced split, the schedule arithmetic, the per-stage memory
plan, and stage models that compute exactly what the whole model computes. The multi-rank
parity runs are in test_pipeline_parity.py."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megalite.errors import ConfigError
from megalite.memory import pipeline_memory
from megalite.parallel.dims import ParallelDims
from megalite.parallel.pp_split import (
    balanced_boundaries,
    bubble_fraction,
    describe_split,
    in_flight,
    split_stages,
    stage_ranks,
)
from megalite.shapes import param_count
from tests.conftest import TINY_MODEL, compose

PP = ["parallel=pp", "train.micro_batch_size=4", "data.seq_len=32"]


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["model.n_layers=2", "parallel.pp=4"],
            r"parallel.pp=4 x parallel.pp_virtual_stages=1 = 4 pipeline stages but "
            r"model.n_layers=2: every stage needs at least one transformer block",
        ),
        (
            ["model.n_layers=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
            r"= 4 pipeline stages but model.n_layers=2",
        ),
        (
            ["parallel.pp_microbatches=1"],
            r"parallel.pp_microbatches=1 is fewer than the parallel.pp=2 pipeline ranks",
        ),
        (
            ["parallel.pp_microbatches=3"],
            r"parallel.pp_microbatches=3 does not divide train.micro_batch_size=4",
        ),
        (["parallel.pp_schedule=zbv"], r"runs exactly 2 stage\(s\) per rank but .*=1"),
        (["parallel.pp_schedule=interleaved_1f1b"], r"runs at least 2 stage\(s\) per rank"),
        (["parallel.pp_virtual_stages=2"], r"pp_schedule=1f1b runs exactly 1 stage"),
        (["parallel.pp_schedule=dualpipe"], r"parallel.pp_schedule='dualpipe' is not one of"),
        (["model.tie_embeddings=true"], r"model.tie_embeddings=true with parallel.pp=2"),
        (["train.loss=fused_linear"], r"train.loss=fused_linear with parallel.pp=2"),
        (["parallel.strategy=single"], r"parallel.strategy=single with parallel.pp=2"),
        (["parallel.pp=0"], r"parallel.pp=0 must be >= 1"),
        (["train.float8=rowwise"], r"train.float8=rowwise with parallel.pp=2"),
        (["train.ckpt_async=thread"], r"train.ckpt_async=thread with parallel.pp=2"),
    ],
)
def test_bad_pipeline_config_fails_when_composed(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose([*TINY_MODEL, *PP, *overrides])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_with_pp_refused(stage):
    with pytest.raises(ConfigError, match=rf"parallel.strategy=zero{stage} with parallel.pp=2: "):
        compose([*TINY_MODEL, "data.seq_len=32", f"parallel=zero{stage}", "parallel.pp=2"])


def test_world_size_must_hold_every_pipeline_rank():
    cfg = compose([*TINY_MODEL, *PP, "parallel.dp_shard=2"])
    with pytest.raises(ConfigError, match=r"dp_shard=2 x tp=1 x pp=2 = 4 but the world size is 2"):
        ParallelDims.from_config(cfg.parallel, 2)
    dims = ParallelDims.from_config(compose([*TINY_MODEL, *PP]).parallel, 8)
    assert (dims.pp, dims.dp_shard, dims.world_size, dims.replication) == (2, 4, 8, 2)
    # Mesh (dp_replicate, dp_shard, pp, cp, tp): the two ranks of a pipeline are consecutive
    # and read the same samples.
    assert [dims.pp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [dims.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]


# ------------------------------------------------------------------------------ split
def brute_force(costs: list[float], n: int, first: float, last: float) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        bounds = [0, *cuts, len(costs)]
        stage = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        stage[0] += first
        stage[-1] += last
        best = min(best, max(stage))
    return best


def test_balanced_split_is_optimal():
    rng = random.Random(0)
    for _ in range(40):
        costs = [rng.uniform(0.5, 2.0) for _ in range(rng.randint(2, 9))]
        n = rng.randint(1, len(costs))
        first, last = rng.uniform(0, 3), rng.uniform(0, 3)
        bounds = balanced_boundaries(costs, n, first, last)
        assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == n + 1
        assert all(a < b for a, b in itertools.pairwise(bounds))
        stage = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        stage[0] += first
        stage[-1] += last
        assert max(stage) == pytest.approx(brute_force(costs, n, first, last))


def test_llama3_70b_split_gives_the_head_stage_fewer_layers():
    cfg = compose(["model=llama3_70b"]).model
    stages = split_stages(cfg, 8, 1, "1f1b", 8192)
    layers = [len(s.layers) for s in stages]
    assert sum(layers) == 80 and [s.rank for s in stages] == list(range(8))
    assert [i for s in stages for i in s.layers] == list(range(80))
    # The output head (6 V C, ~1 block) costs the last stage a block; the embedding is cheap.
    assert layers[-1] < max(layers)
    assert max(s.cost for s in stages) / min(s.cost for s in stages) < 1.15
    text = describe_split(stages)
    assert "stage 0 (rank 0): embed + layers 0-" in text and "79 + head" in text


def test_v_layout_puts_first_and_last_stage_on_rank_0():
    assert stage_ranks(4, 8, "v") == [0, 1, 2, 3, 3, 2, 1, 0]
    assert stage_ranks(4, 8, "loop") == [0, 1, 2, 3, 0, 1, 2, 3]
    cfg = compose(["model=llama3_405b"]).model
    stages = split_stages(cfg, 8, 2, "zbv", 8192)
    assert stages[0].rank == stages[-1].rank == 0 and sum(len(s.layers) for s in stages) == 126


# ----------------------------------------------------------------------- schedules
def test_bubble_fractions():
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction("zbv", 4, 8, 2) == 0.0
    assert bubble_fraction("zbv", 4, 4, 2) == pytest.approx(3 / 11)


def test_micro_batches_in_flight():
    assert in_flight("gpipe", 4, 8, 1, 0) == 8
    assert [in_flight("1f1b", 4, 8, 1, r) for r in range(4)] == [4, 3, 2, 1]
    # Interleaved 1F1B, rank 0: p + (p - 1) / v micro-batches' worth (Megatron-LM).
    assert in_flight("interleaved_1f1b", 4, 8, 2, 0) == pytest.approx(4 + 3 / 2)


def test_pipeline_memory_per_rank():
    base = [*TINY_MODEL, "model.n_layers=4", *PP, "train.precision=fp32"]
    cfg = compose(base)
    dims = ParallelDims.from_config(cfg.parallel, 2)
    ranks = pipeline_memory(cfg, dims)
    assert len(ranks) == 2
    # Without sharding the stages' states add up to the whole model's (16 bytes / parameter).
    states = sum(e.params_gb + e.grads_gb + e.optimizer_gb for e in ranks)
    assert states * 2**30 == pytest.approx(16 * param_count(cfg.model))
    # 1F1B: rank 0 holds p = 2 micro-batches in flight, rank 1 one (plus the head's logits).
    assert "rank 0: embed + layers 0-1, 2 micro-batches in flight" in ranks[0].layout
    gpipe = compose([*base, "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4"])
    # GPipe holds all 4 chunks of 1 sequence: as much as 1F1B's 2 chunks of 2 sequences.
    g0 = pipeline_memory(gpipe, dims)[0].activations_gb["none"]
    assert g0 == pytest.approx(ranks[0].activations_gb["none"])
    assert "4 micro-batches in flight" in pipeline_memory(gpipe, dims)[0].layout


# ------------------------------------------------------------------------ stage models
def test_stage_models_chain_to_the_full_model():
    """Stages built from the meta model keep the full model's names and initial weights;
    chained, they compute the full model's logits exactly (fp32, one process)."""
    from megalite.model.transformer import build_model
    from megalite.parallel.pipeline import StageModel, group_names

    cfg = compose([*TINY_MODEL, "model.n_layers=4", *PP])
    full = build_model(cfg.model, loss="torch", seed=cfg.train.seed)
    stages = []
    for stage in split_stages(cfg.model, 2, 2, "interleaved_1f1b", 32):
        with torch.device("meta"):
            m = StageModel(cfg.model, "torch", stage)
        m.to_empty(device="cpu")
        m.init_weights(seed=cfg.train.seed)
        stages.append(m)
    names = [n for m in stages for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in full.named_parameters())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    h = tokens
    with torch.no_grad():
        for m in stages:
            h = m(h)
        assert torch.equal(h, full(tokens))
    groups = group_names(full, cfg)
    assert sum(map(len, groups)) == len(names) and "tok_embeddings.weight" in groups[1]


# ------------------------------------------------------------------------------ planner
def test_plan_recommends_fitting_layouts_for_70b_and_405b():
    """megalite-plan --recommend-layout: every candidate fits; for 405B on 512 GPUs of 80 GB
    none fits without pipeline parallelism (FSDP x TP alone holds 16 bytes per parameter over
    at most 512 ranks plus a whole 70-126-layer activation stack), and the best layout's
    overrides compose into a valid config."""
    from megalite.parallel.pp_plan import candidates, recommend

    common = ["data.seq_len=8192", "train.precision=bf16", "train.loss=torch"]
    for model, gpus, batch in (("llama3_70b", 64, 512), ("llama3_405b", 512, 2048)):
        cfg = compose([f"model={model}", *common])
        found = candidates(cfg, gpus, 72.0, batch)
        assert found, model
        assert all(c.memory.total_gb() <= 72.0 and c.pp * c.dp * c.tp == gpus for c in found)
        best = found[0]
        assert best.score == max(c.score for c in found)
        compose([f"model={model}", *common, *best.overrides()])
        assert "megalite-train parallel=fsdp_tp" in recommend(cfg, gpus, 72.0, batch)
    assert all(c.pp > 1 for c in found) and best.tp == 8  # 405B


def test_plan_prints_every_pipeline_rank(capsys):
    from megalite.plan import main

    argv = ["--gpus", "64", "--gpu", "h100", "--hours", "24", "--model", "llama3_70b"]
    layout = ["--layout", "pp_3d", "train.micro_batch_size=8"]
    assert main([*argv, *layout]) == 0
    out = capsys.readouterr().out
    assert "per pipeline rank (interleaved_1f1b, AC none), GB:" in out
    assert "0 " in out and "embed + layers 0-" in out and "+ head" in out
    assert "bubble with 8 micro-batches per step: gpipe 27.3%, 1f1b 27.3%" in out


def test_bench_grid_takes_pipeline_cells():
    from megalite.bench_grid import GridConfig, expand

    grid = GridConfig(parallel=["pp", "pp parallel.pp_schedule=zbv parallel.pp_virtual_stages=2"])
    labels = [c.label() for c in expand(grid)]
    assert labels[1].startswith("debug pp pp_schedule=zbv pp_virtual_stages=2")
    assert all(c.multi_rank for c in expand(grid))
