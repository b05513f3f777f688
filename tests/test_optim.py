"""Learning-rate schedules and weight-decay groups."""

from __future__ import annotations

import pytest
import torch

from megalite.config import ModelConfig, OptimConfig
from megalite.model.transformer import build_model
from megalite.optim import adamw_implementation, build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, cfg, 111) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: (peak + floor) / 2
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_is_flat_then_linear_decay():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[4] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[5:80])
    assert lrs[80] == pytest.approx(0.95) and lrs[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))


def test_constant_after_warmup():
    cfg = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg, 50) for s in range(50)} == {0.5}


@pytest.mark.parametrize("tied", [False, True])
def test_no_weight_decay_on_norms_and_embeddings(tied):
    model = build_model(
        ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, tie_embeddings=tied)
    )
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert all("norm" in n or "tok_embeddings" in n for n in plain)
    assert "tok_embeddings.weight" in plain
    assert all(
        n.endswith(
            (
                "wq.weight",
                "wk.weight",
                "wv.weight",
                "wo.weight",
                "w1.weight",
                "w2.weight",
                "w3.weight",
                "output.weight",
            )
        )
        for n in decayed
    )
    assert ("output.weight" in decayed) == (not tied)
    n_total = sum(1 for _ in model.parameters())  # unique parameters
    assert len(decayed) + len(plain) == n_total
    both = param_groups(
        model, OptimConfig(weight_decay=0.1, decay_norms=True, decay_embeddings=True)
    )
    assert len(both) == 1


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    assert adamw_implementation("cuda") == {"fused": True}
    for device_type in ("cpu", "meta", "mixed"):
        assert adamw_implementation(device_type) == {"foreach": True}


def test_build_optimizer_picks_the_implementation_from_the_parameters():
    model = build_model(ModelConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.1))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))).backward()
    before = model.output.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.output.weight, before)


def test_the_cuda_choice_steps_fsdp2_dtensor_parameters(tmp_path):
    """fused=True over FSDP2's DTensor parameters (a 1-rank gloo group; CPU has a fused AdamW
    kernel too, and the DTensor dispatch is the one a CUDA run takes)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = build_model(ModelConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2))
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = torch.optim.AdamW(
            param_groups(model, OptimConfig()), lr=0.1, **adamw_implementation("cuda")
        )
        model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))).backward()
        before = model.output.weight.full_tensor().clone()
        opt.step()
        assert not torch.equal(model.output.weight.full_tensor(), before)
    finally:
        torch.distributed.destroy_process_group()
