"""Shape arithmetic: parameter counts against the built models and the published sizes, FLOPs
per token (model and hardware) against torch's FlopCounterMode, bytes per checkpoint."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalite.config import ModelConfig
from megalite.model.transformer import Transformer, build_model, count_params
from megalite.parallel.checkpointing import apply_ac
from megalite.plan import load_presets
from megalite.shapes import (
    checkpoint_bytes,
    flops_per_token,
    hardware_flops_per_token,
    matmul_params,
    param_count,
)

# Published parameter counts (the Hugging Face model cards / safetensors index).
LLAMA3_8B = 8_030_261_248
LLAMA3_70B = 70_553_706_496
LLAMA32_1B = 1_235_814_400


# ----------------------------------------------------------------------------- parameters
def test_param_count_matches_built_models_and_published_sizes():
    presets = load_presets()
    assert {"debug", "llama3_1b", "llama3_8b", "llama3_70b", "llama_125m"} <= set(presets)
    for name, cfg in presets.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        assert param_count(cfg) == count_params(model), name
    assert param_count(presets["llama3_8b"]) == LLAMA3_8B
    assert param_count(presets["llama3_70b"]) == LLAMA3_70B
    assert param_count(presets["llama3_1b"]) == LLAMA32_1B


def test_checkpoint_holds_weights_and_moments():
    """fp32 weights and AdamW's two fp32 moments (no gradients), and 5 % on top."""
    assert checkpoint_bytes(1_000_000) == 12_600_000


# ---------------------------------------------------------------------------------- FLOPs
GQA_TIED = dict(
    vocab_size=131, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, tie_embeddings=True
)
MHA = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64)


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


@pytest.mark.parametrize("shape", [MHA, GQA_TIED], ids=["mha", "gqa-tied"])
def test_attention_term_against_counter_with_math_sdpa(shape):
    """Under the math SDPA backend the counter sees QK^T and AV over the full T x T matrix:
    exactly our (non-causally-halved) attention term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig(**shape, max_seq_len=64)
    model = build_model(cfg)
    b, t = 2, 16
    x = torch.randint(0, cfg.vocab_size, (b, t))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        model(x, x).backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, t) * b * t, rel=0.01)


def _counted_flops(cfg: ModelConfig, ac: str, math_sdpa: bool, b: int = 2, t: int = 24) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(cfg)
    apply_ac(model, ac)
    x = torch.randint(0, cfg.vocab_size, (b, t))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]) if math_sdpa else nullcontext(), counter:
        model(x, x).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [MHA, GQA_TIED], ids=["mha", "gqa-tied"])
@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_hardware_flops_with_recompute_match_flop_counter(shape, ac):
    """HFU's numerator: with megalite's own activation checkpointing applied, the counter sees the
    recomputed forward in backward. Full AC re-runs every block up to its down projection
    (checkpoint's early stop) and the forward attention term; selective keeps matmul and
    attention outputs, so adds nothing. CPU SDPA counts 0 (matmul part only); math SDPA adds
    the attention term."""
    cfg = ModelConfig(**shape, max_seq_len=64)
    b, t = 2, 24
    counted = _counted_flops(cfg, ac, math_sdpa=False, b=b, t=t)
    attention = 12 * cfg.n_layers * cfg.dim * t
    recompute_attention = 4 * cfg.n_layers * cfg.dim * t if ac == "full" else 0
    hw = hardware_flops_per_token(cfg, t, ac)
    assert counted == pytest.approx((hw - attention - recompute_attention) * b * t, rel=0.01)
    assert _counted_flops(cfg, ac, math_sdpa=True, b=b, t=t) == pytest.approx(hw * b * t, rel=0.01)
    if ac == "full":
        # The documented form: blocks count 8x but for the down projection, the head 6x.
        blocks = matmul_params(cfg) - cfg.dim * cfg.vocab_size
        w2 = cfg.n_layers * cfg.dim * cfg.hidden_dim
        assert hw - flops_per_token(cfg, t) == 2 * (blocks - w2) + recompute_attention
    else:
        assert hw == flops_per_token(cfg, t)


def test_hardware_flops_rejects_unknown_mode():
    with pytest.raises(ValueError, match="activation_checkpointing='partial'"):
        hardware_flops_per_token(ModelConfig(), 128, "partial")
