"""The Triton kernels wired into the model: training with them (in the interpreter) follows the
training with the PyTorch references.

Tolerance: 1e-4 relative on every step's loss over 20 fp32 steps. The kernels accumulate in a
different order than PyTorch (blocked softmax, chunked cross-entropy), about 1e-6 relative per
op; 20 steps of AdamW amplify that to ~1e-5 at most (measured: see the assertion message).
A wrong kernel (mask, scale, gradient) moves the loss by > 1e-2 within a few steps.
"""

from __future__ import annotations

import gc

import pytest

from megalite.metrics import read_metrics
from tests.conftest import compose, tiny_train_overrides

# head_dim 32: the smallest the attention kernel supports.
KERNEL_MODEL = ["model.dim=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=192"]
STEPS = 20


def run(data, run_dir, *extra: str) -> dict[int, float]:
    from megalite.trainer import Trainer

    overrides = tiny_train_overrides(
        data, run_dir, max_steps=STEPS, micro_batch_size=2, eval_every=0, ckpt_every=0
    )
    Trainer(compose([*overrides, *KERNEL_MODEL, *extra])).fit()
    gc.collect()
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize(
    "backends",
    [
        ["model.attention=triton", "model.norm=triton", "train.loss=triton"],
        ["model.attention=triton", "model.norm=triton", "train.loss=fused_linear"],
    ],
    ids=["triton-ce", "fused-linear-ce"],
)
def test_training_with_kernels_matches_references(tiny_data, tmp_path, backends):
    ref = run(
        tiny_data, tmp_path / "ref", "model.attention=sdpa", "model.norm=torch", "train.loss=torch"
    )
    got = run(tiny_data, tmp_path / "kernels", *backends)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    assert worst < 1e-4, f"max relative loss difference {worst:.2e}"
    assert ref[STEPS] < ref[1] - 0.1  # it trained
