"""FLOPs per token against torch's FlopCounterMode, the peak table, MFU inputs, sinks."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalite.config import ModelConfig, WandbConfig
from megalite.metrics import (
    MetricsLogger,
    flops_per_token,
    lookup_peak_tflops,
    matmul_params,
    plot_losses,
    redact,
)
from megalite.model.transformer import build_model


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96),  # MHA
        dict(vocab_size=257, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=160),  # GQA
        dict(
            vocab_size=131,
            dim=64,
            n_layers=2,
            n_heads=8,
            n_kv_heads=1,
            ffn_dim=128,
            tie_embeddings=True,
        ),
    ],
)
def test_matmul_flops_match_flop_counter(shape):
    """FlopCounterMode counts every matmul of forward + backward. CPU SDPA has no FLOP formula
    (counted as 0), so the counter measures exactly the 6 * N_matmul part of our convention."""
    cfg = ModelConfig(**shape, max_seq_len=64)
    model = build_model(cfg)
    b, t = 2, 24
    x = torch.randint(0, cfg.vocab_size, (b, t))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, x).backward()
    counted = counter.get_total_flops()
    ours = 6 * matmul_params(cfg) * b * t
    assert counted == pytest.approx(ours, rel=0.01)
    # The documented total adds the attention term 12 * L * C * T per token on top.
    assert flops_per_token(cfg, t) * b * t == pytest.approx(
        ours + 12 * cfg.n_layers * cfg.dim * t * b * t
    )


def test_attention_term_against_counter_with_math_sdpa():
    """Under the math SDPA backend the counter sees QK^T and AV over the full T x T matrix:
    exactly our (non-causally-halved) attention term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64
    )
    model = build_model(cfg)
    b, t = 2, 16
    x = torch.randint(0, 64, (b, t))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        model(x, x).backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, t) * b * t, rel=0.01)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA B200", 2250.0),
        ("AMD Instinct MI300X", 1307.4),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA A10", 125.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table_lookup(name, tflops):
    assert lookup_peak_tflops(name) == tflops


def test_redact_drops_secrets():
    cfg = {"logging": {"wandb": {"api_key": "abc123", "project": "p"}}, "token_budget": 5}
    out = redact(cfg)
    assert out["logging"]["wandb"]["api_key"] == "<redacted>"
    assert out["logging"]["wandb"]["project"] == "p" and out["token_budget"] == 5


def test_jsonl_sink_and_plot(tmp_path, capsys):
    logger = MetricsLogger(
        tmp_path, enabled=True, console=True, jsonl=True, wandb_cfg=WandbConfig(), config={}
    )
    rec = dict(
        step=1,
        loss=5.0,
        lr=1e-3,
        grad_norm=1.0,
        tokens=100,
        tokens_per_s=10.0,
        tflops_per_device=0.1,
        mfu=0.5,
        mem_gb=1.0,
    )
    logger.log(rec)
    logger.log({"step": 1, "val_loss": 4.0, "val_ppl": 54.6, "tokens": 100})
    assert "loss 5.0000" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == rec and lines[1]["val_loss"] == 4.0
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png", baseline=6.0)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_sink_writes_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(
        tmp_path,
        enabled=True,
        console=False,
        jsonl=False,
        wandb_cfg=WandbConfig(mode="offline", project="t"),
        config={"a": 1},
    )
    logger.log({"step": 1, "val_loss": 4.0, "val_ppl": 54.6, "tokens": 100})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
