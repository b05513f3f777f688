"""Model families for scaling studies: one rule that turns a width into a whole model shape, so
the sizes of a sweep differ in one knob and the fit sees a smooth curve, not a zoo of presets.

The `llama` family (megalite's transformer, SwiGLU, RoPE, untied embeddings):

    width     dim from the ladder WIDTHS (steps of ~1.25-1.33x, multiples of 32)
    depth     n_layers = max(2, round(dim / aspect)), aspect = clamp(dim / 16, 64, 128):
              dim / 64 up to dim 1024 (GPT-2 small: 768 / 12), 16 layers between 1024 and
              2048, dim / 128 above (Llama 3 8B: 4096 / 32)
    heads     head_dim = 32 up to dim 384, 64 up to dim 2048, 128 above; n_heads = dim / head_dim
    kv heads  all heads (multi-head) below dim 4096, 8 from there on (grouped-query, as Llama 3)
    MLP       ffn_dim = 8/3 dim rounded up to a multiple of 32 (256 from dim 1024 on)
    vocab     the dataset's (its manifest), seq_len the data config's

Parameter counts and FLOPs per token come from megalite/shapes.py, the same arithmetic the
trainer's MFU and `megalite-plan` use.
"""

from __future__ import annotations

import dataclasses
import math

from megalite.config import ModelConfig
from megalite.errors import ConfigError

WIDTHS = (
    32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 16384,
)  # fmt: skip


def llama_shape(dim: int, vocab_size: int, seq_len: int) -> ModelConfig:
    """The `llama` family's model of width `dim` (rule in the module docstring)."""
    aspect = min(128.0, max(64.0, dim / 16))
    n_layers = max(2, round(dim / aspect))
    head_dim = 32 if dim <= 384 else 64 if dim <= 2048 else 128
    if dim % head_dim:
        head_dim = 16  # the narrow widths (48, 80): still an even head dim for RoPE
    n_heads = dim // head_dim
    n_kv_heads = n_heads if dim < 4096 else 8
    multiple = 32 if dim < 1024 else 256
    ffn = multiple * math.ceil(8 * dim / 3 / multiple)
    return ModelConfig(
        name=f"scale_llama_d{dim}",
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn,
        multiple_of=multiple,
        max_seq_len=seq_len,
        tie_embeddings=False,
    )


FAMILIES = {"llama": llama_shape}


def family_shapes(
    family: str, vocab_size: int, seq_len: int, base: ModelConfig | None = None
) -> list[ModelConfig]:
    """Every shape of `family` for this vocabulary and sequence length, smallest first. Fields
    the family does not set (norm_eps, rope_theta, init_std, backends) come from `base`."""
    if family not in FAMILIES:
        raise ConfigError(f"--family={family!r} is not one of {', '.join(FAMILIES)}")
    shapes = [FAMILIES[family](dim, vocab_size, seq_len) for dim in WIDTHS]
    if base is None:
        return shapes
    kept = {
        f: getattr(base, f) for f in ("norm_eps", "rope_theta", "init_std", "attention", "norm")
    }
    return [dataclasses.replace(s, **kept) for s in shapes]
