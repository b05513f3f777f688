"""The model: shapes, causality, GQA, tied embeddings, meta-device build, backends, and logits
parity with Hugging Face transformers' Llama as an independent oracle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from megalite.kernels import reference

from megalite.config import ModelConfig
from megalite.interop.llama_map import hf_name
from megalite.model.layers import BackendUnavailableError, attention_fn
from megalite.model.transformer import Transformer, build_model, count_params, resolve_backends

SMALL = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64)


def test_logits_and_loss_shapes():
    model = build_model(ModelConfig(**SMALL))
    x = torch.randint(0, 97, (3, 17))
    assert model(x).shape == (3, 17, 97)
    loss = model(x, x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # At init the model is close to uniform over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_causal_future_tokens_do_not_change_the_past():
    model = build_model(ModelConfig(**SMALL))
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 97, (8,))
    torch.testing.assert_close(model(x)[0, :12], model(y)[0, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(model(x)[0, 12:], model(y)[0, 12:])


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2), (8, 2)])
def test_sdpa_gqa_matches_reference_attention(n_heads, n_kv):
    q = torch.randn(2, 19, n_heads, 16)
    k, v = torch.randn(2, 19, n_kv, 16), torch.randn(2, 19, n_kv, 16)
    torch.testing.assert_close(attention_fn("sdpa")(q, k, v), reference.attention(q, k, v))


def test_tied_embeddings_share_one_tensor():
    tied = build_model(ModelConfig(**SMALL, tie_embeddings=True))
    untied = build_model(ModelConfig(**SMALL))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert count_params(untied) - count_params(tied) == 97 * 48


def test_meta_build_allocates_nothing_and_init_is_deterministic():
    with torch.device("meta"):
        big = Transformer(
            ModelConfig(
                vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336
            )
        )
    assert all(p.is_meta for p in big.parameters())
    a, b = build_model(ModelConfig(**SMALL), seed=3), build_model(ModelConfig(**SMALL), seed=3)
    c = build_model(ModelConfig(**SMALL), seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


def test_residual_projections_are_depth_scaled():
    model = build_model(ModelConfig(vocab_size=128, dim=256, n_layers=8, n_heads=4, init_std=0.02))
    wo = model.layers["0"].attention.wo.weight.std().item()
    wq = model.layers["0"].attention.wq.weight.std().item()
    assert wq == pytest.approx(0.02, rel=0.05)
    assert wo == pytest.approx(0.02 / 4, rel=0.05)  # 1 / sqrt(2 * 8)


def test_flash_attn_missing_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(
            BackendUnavailableError,
            match=r"model.attention=flash_attn .*pip install megalite\[gpu\]",
        ):
            Transformer(ModelConfig(**SMALL, attention="flash_attn"))
    else:
        pytest.skip("flash-attn is installed here")


@pytest.mark.parametrize(
    "device_type, tp, loss",
    [("cuda", 1, "fused_linear"), ("cuda", 2, "torch"), ("cpu", 1, "torch")],
)
def test_auto_backends(device_type, tp, loss):
    """auto: torch SDPA and the torch norm on every device (megalite's Triton attention and norm
    and flash-attn are opt-in); the fused linear + CE loss on CUDA unless the vocab is sharded."""
    cfg, got_loss = resolve_backends(ModelConfig(**SMALL), "auto", device_type, tp)
    assert (cfg.attention, cfg.norm, got_loss) == ("sdpa", "torch", loss)
    chosen = ModelConfig(**SMALL, attention="triton", norm="triton")
    cfg, got_loss = resolve_backends(chosen, "triton", device_type, tp)
    assert (cfg.attention, cfg.norm, got_loss) == ("triton", "triton", "triton")


def test_model_package_never_imports_torch_distributed():
    model_dir = Path(__file__).resolve().parents[2] / "megalite" / "model"
    imports = re.compile(r"^\s*(from|import)\s+torch\.distributed", re.MULTILINE)
    for path in model_dir.glob("*.py"):
        assert not imports.search(path.read_text()), path


@pytest.mark.parametrize("tied, n_kv", [(False, 2), (True, 6)])
def test_logits_match_transformers_llama(tied, n_kv):
    """Same weights in transformers' LlamaForCausalLM give the same logits (fp32, 1e-5): checks
    RoPE (rotate-half layout), GQA, RMSNorm placement and SwiGLU against an independent code."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**SMALL, "n_kv_heads": n_kv}, tie_embeddings=tied, rope_theta=5e5)
    ours = build_model(cfg, seed=1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # The converter's name table (megalite.interop.llama_map), so the two cannot drift apart.
    hf_sd = {hf_name(name): tensor for name, tensor in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    x = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
