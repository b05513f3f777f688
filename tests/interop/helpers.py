"""Builders shared by the interop, evaluation and generation tests: random Hugging Face Llama
models (the oracle) and megalite checkpoints written without a training run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megalite.config import ModelConfig
from megalite.interop.llama_hf import write_checkpoint
from megalite.model.transformer import build_model

SMALL_HF = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=5e5,
)


def random_hf_llama(*, tied: bool, n_kv: int = 2, seed: int = 0, **overrides):
    """A randomly initialized transformers LlamaForCausalLM (eager attention: an implementation
    independent of megalite's SDPA path). Weights are drawn wider than HF's 0.02 init and the
    norm weights are not ones, so logits are far from uniform and a wrong norm would show."""
    import transformers

    cfg = transformers.LlamaConfig(
        **{**SMALL_HF, **overrides},
        num_key_value_heads=n_kv,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def random_checkpoint(
    out: Path, cfg: ModelConfig, *, seed: int = 0, tokenizer: Path | None = None
) -> Path:
    """A megalite checkpoint dir holding a randomly initialized model (init_std as configured),
    with the tokenizer copied in, as megalite-convert writes one."""
    model = build_model(cfg, seed=seed)
    out.mkdir(parents=True)
    write_checkpoint(model.state_dict(), cfg, out, {"source": {"format": "test"}})
    if tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.json")
    return out
