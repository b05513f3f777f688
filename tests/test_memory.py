"""The per-rank memory estimate: the activation model against what autograd saves, per-layout
state memory by hand, FSDP2's unsharded units and gradients, and the trainer's start-up memory
plan next to its measured peak."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megalite.config import ConfigError, ModelConfig
from megalite.memory import activation_bytes, estimate_memory
from megalite.model.transformer import build_model
from megalite.parallel.dims import ParallelDims
from megalite.plan import load_presets
from megalite.shapes import block_params, matmul_params
from tests.conftest import compose, tiny_train_overrides

GB = 2**30
LLAMA3_8B = 8_030_261_248  # the Hugging Face model card's count


# ----------------------------------------------------------------------- activations
def saved_bytes(cfg: ModelConfig, b: int, t: int, mode: str) -> int:
    """Bytes of the unique non-parameter tensors autograd saves in one forward of megalite's
    model: fp32, bf16 autocast over fp32 weights, or bf16 weights (what FSDP2 computes with)."""
    model = build_model(cfg)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(x, y)
    return sum(seen.values())


SHAPES = {
    "gqa": dict(vocab_size=500, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=136),
    "mha-tied": dict(
        vocab_size=300, dim=64, n_layers=2, n_heads=4, ffn_dim=160, tie_embeddings=True
    ),
}


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_model_matches_saved_tensors(shape, mode):
    cfg = ModelConfig(**SHAPES[shape], max_seq_len=64)
    b, t = 3, 37
    measured = saved_bytes(cfg, b, t, mode)
    planned = activation_bytes(cfg, b * t, mode, "none", logits_grad=False)
    if mode == "autocast":
        # Autocast also keeps a bf16 copy of every matmul weight until backward: the plan counts
        # those as buffers, not activations.
        planned += 2 * matmul_params(cfg)
    assert measured == pytest.approx(planned, rel=0.01)


def test_checkpointing_keeps_less():
    cfg = load_presets()["llama3_8b"]
    none, sel, full = (
        activation_bytes(cfg, 8192, "bf16", ac) for ac in ("none", "selective", "full")
    )
    assert full < sel < none
    # Full checkpointing keeps one bf16 residual per layer plus one rebuilt block and the head.
    one_block_and_head = activation_bytes(dataclasses.replace(cfg, n_layers=1), 8192, "bf16")
    assert full == pytest.approx(cfg.n_layers * 2 * cfg.dim * 8192 + one_block_and_head)


# ---------------------------------------------------------------------------- states
def plan_for(overrides: list[str], world: int):
    cfg = compose(["model=llama3_8b", "data.seq_len=8192", "train.micro_batch_size=1", *overrides])
    return cfg, estimate_memory(cfg, ParallelDims.from_config(cfg.parallel, world))


def test_state_memory_per_layout_by_hand():
    """fp32 master weights, fp32 grads, two fp32 AdamW moments: 4 + 4 + 8 bytes per parameter,
    divided by what shards them."""
    p = LLAMA3_8B
    _, fsdp = plan_for(["parallel=fsdp"], 8)
    assert (fsdp.params_gb, fsdp.grads_gb, fsdp.optimizer_gb) == pytest.approx(
        (4 * p / 8 / GB, 4 * p / 8 / GB, 8 * p / 8 / GB)
    )
    cfg, ddp = plan_for(["parallel=ddp"], 8)
    assert (ddp.params_gb, ddp.grads_gb, ddp.optimizer_gb) == pytest.approx(
        (4 * p / GB, 4 * p / GB, 8 * p / GB)
    )
    # bf16 autocast weight copies + DDP's gradient buckets.
    assert ddp.buffers_gb == pytest.approx((2 * matmul_params(cfg.model) + 4 * p) / GB)
    # tp=4: everything a quarter, activations included.
    cfg, tp = plan_for(["parallel=tp"], 4)
    assert tp.params_gb == pytest.approx(p / GB)
    assert tp.activations_gb["none"] == pytest.approx(
        activation_bytes(cfg.model, 8192, "autocast") / 4 / GB
    )
    _, fsdp_tp = plan_for(["parallel=fsdp_tp", "parallel.tp=2"], 8)
    assert fsdp_tp.optimizer_gb == pytest.approx(8 * p / 8 / GB)
    # DeepSpeed, fp32 (benchmarks/bench_parallel_memory.py's theory): zero1 = 8P + 8P/4.
    _, zero1 = plan_for(["parallel=zero1", "train.precision=fp32"], 4)
    assert zero1.params_gb + zero1.grads_gb + zero1.optimizer_gb == pytest.approx(
        (8 * p + 8 * p / 4) / GB
    )
    # bf16 zero3: bf16 params and grads sharded, fp32 grad partition, fp32 master + moments.
    _, zero3 = plan_for(["parallel=zero3"], 4)
    assert (zero3.params_gb, zero3.grads_gb, zero3.optimizer_gb) == pytest.approx(
        (2 * p / 4 / GB, 6 * p / 4 / GB, 12 * p / 4 / GB)
    )


def test_fsdp_buffers_follow_its_units_and_deferred_gradients():
    """FSDP2 holds whole, in bf16, the [norm, output] unit and two blocks (the last one and the
    one prefetched for backward), next to the largest unit's unsharded fp32 gradient (the output
    layer's). Under gradient accumulation with deferred sync every parameter's unsharded fp32
    gradient stays until the last micro-batch instead; HSDP reduce-scatters every micro-batch."""
    cfg, fsdp = plan_for(["parallel=fsdp"], 8)
    m = cfg.model
    p, head, block = LLAMA3_8B, m.vocab_size * m.dim + m.dim, block_params(m)
    assert head > block
    whole = (head + 2 * block) * 2
    assert fsdp.buffers_gb == pytest.approx((whole + 4 * head) / GB)
    _, deferred = plan_for(["parallel=fsdp", "train.grad_accum_steps=4"], 8)
    assert deferred.buffers_gb == pytest.approx((whole + 4 * p) / GB)
    _, every = plan_for(
        ["parallel=fsdp", "train.grad_accum_steps=4", "parallel.defer_grad_sync=false"], 8
    )
    assert every.buffers_gb == fsdp.buffers_gb
    _, hsdp = plan_for(["parallel=hsdp", "parallel.dp_shard=4", "train.grad_accum_steps=4"], 8)
    assert hsdp.buffers_gb == fsdp.buffers_gb
    # Tensor parallelism shards every unit and gradient tp ways.
    _, fsdp_tp = plan_for(["parallel=fsdp_tp", "parallel.tp=2", "train.grad_accum_steps=4"], 8)
    assert fsdp_tp.buffers_gb == pytest.approx((whole + 4 * p) / 2 / GB)


def test_layout_must_fit_the_world_size():
    with pytest.raises(ConfigError, match="parallel.strategy=single but the world size is 2"):
        plan_for(["parallel=single"], 2)


# ---------------------------------------------------------------------- trainer logs
def test_trainer_logs_the_memory_plan_and_the_measured_peak(tiny_data, tmp_path, capsys):
    from megalite.trainer import Trainer

    cfg = compose(tiny_train_overrides(tiny_data, tmp_path / "run", max_steps=2, log_every=1))
    trainer = Trainer(cfg)
    trainer.fit()
    out = capsys.readouterr().out
    # The trainer's config has the `auto` backends resolved (the torch loss on a CPU).
    planned = estimate_memory(trainer.cfg, trainer.dims)
    assert planned.summary() in out and "fp32, micro-batch 4 x 32, loss torch" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("memory: measured peak")]
    assert "per rank vs planned" in line and "whole process's RSS" in line
