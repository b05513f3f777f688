"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Single-device code: nothing here imports torch.distributed. Backends are chosen by config and
resolved once, at construction; the Triton kernels and flash-attn are imported lazily so a CPU box
without them imports this module.

Shape legend: B batch, T sequence, H query heads, K kv heads, D head dim, C model dim, F ffn dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.backends import ATTENTION, NORM
from megalite.errors import BackendUnavailableError
from megalite.kernels import reference

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._fn = _norm_fn(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, self.eps)


def _norm_fn(backend: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    if backend == "torch":
        return reference.rms_norm
    if backend == "triton":
        try:
            from megalite.kernels.rms_norm import rms_norm
        except ImportError as e:
            raise BackendUnavailableError(
                f"model.norm=triton but the Triton RMSNorm kernel cannot be imported ({e}); "
                "use model.norm=torch"
            ) from e
        return rms_norm
    raise ValueError(f"{NORM.key}={backend!r} is not one of {', '.join(NORM.backends)}")


# -------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | None = None,
    scaling: tuple[float, float, float, int] | None = None,
) -> torch.Tensor:
    """cos and sin tables stacked as (2, T, D/2), in fp32. `scaling`: Llama 3.1's frequency
    scaling, ModelConfig.rope_scaling_params."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, *scaling)
    t = torch.arange(max_seq_len, device=device).float()
    angles_TD = torch.outer(t, inv_freq)
    return torch.stack([angles_TD.cos(), angles_TD.sin()])


def llama3_scaled(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, original_len: int
) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling. With r = original_len / wavelength (the number of
    turns a frequency makes over the original context): r <= low, a long wavelength, gets the
    frequency divided by `factor`; r >= high keeps it; in between the frequency is the mix
    (1 - s) * f / factor + s * f with s = (r - low) / (high - low), linear in r."""
    turns = original_len * inv_freq / (2 * math.pi)
    s = ((turns - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - s) * inv_freq / factor + s * inv_freq


def apply_rope(x_BTHD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x[..., i], x[..., i + D/2]): the "rotate-half" layout of GPT-NeoX and
    Hugging Face Llama checkpoints (Meta's original checkpoints interleave pairs instead; the
    converter permutes q/k weights between the two)."""
    t = x_BTHD.shape[1]
    return _rotate(x_BTHD, rope[0, :t, None, :], rope[1, :t, None, :])


def apply_rope_at(x_BTHD: torch.Tensor, rope: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
    """`apply_rope` at explicit positions per sequence (incremental decoding, left padding)."""
    return _rotate(x_BTHD, rope[0][pos_BT][:, :, None, :], rope[1][pos_BT][:, :, None, :])


def _rotate(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x_BTHD)


# --------------------------------------------------------------------------------- attention
def _sdpa(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    out_BHTD = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out_BHTD.transpose(1, 2)


def _sdpa_masked(
    q_BTHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor, mask_BTS: torch.Tensor
) -> torch.Tensor:
    """Attention of T new queries over S cached keys under an explicit boolean mask: causal
    kernels (triton, flash-attn) assume queries and keys start at the same position."""
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BSKD, v_BSKD))
    out_BHTD = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_BTS[:, None], enable_gqa=q.shape[1] != k.shape[1]
    )
    return out_BHTD.transpose(1, 2)


def attention_fn(backend: str) -> AttentionFn:
    """Causal attention on (B, T, heads, D) tensors for `model.attention=<backend>`."""
    if backend == "sdpa":
        return _sdpa
    if backend == "triton":
        try:
            from megalite.kernels.flash_attention import flash_attention
        except ImportError as e:
            raise BackendUnavailableError(
                f"model.attention=triton but the Triton attention kernel cannot be imported "
                f"({e}); use model.attention=sdpa"
            ) from e
        return lambda q, k, v: flash_attention(q, k, v, causal=True)
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise BackendUnavailableError(
                "model.attention=flash_attn but the flash-attn package is not installed "
                f"({e}); install it with `pip install megalite[gpu]` on a CUDA machine, "
                "or use model.attention=sdpa (or triton)"
            ) from e
        # flash-attn takes (B, T, heads, D) and handles GQA itself.
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    raise ValueError(f"{ATTENTION.key}={backend!r} is not one of {', '.join(ATTENTION.backends)}")


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, attention: AttentionFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self._attention = attention

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: torch.Tensor,
        cache: KVCache | None = None,
        layer_id: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x_BTC.shape
        # -1 instead of the head counts: under tensor parallelism each rank holds a slice of heads.
        q_BTHD = self.wq(x_BTC).view(b, t, -1, self.head_dim)
        k_BTKD = self.wk(x_BTC).view(b, t, -1, self.head_dim)
        v_BTKD = self.wv(x_BTC).view(b, t, -1, self.head_dim)
        if cache is None:
            q_BTHD, k_BTKD = apply_rope(q_BTHD, rope), apply_rope(k_BTKD, rope)
            out_BTHD = self._attention(q_BTHD, k_BTKD, v_BTKD)
        else:
            q_BTHD = apply_rope_at(q_BTHD, rope, cache.pos_BT)
            k_BTKD = apply_rope_at(k_BTKD, rope, cache.pos_BT)
            k_BSKD, v_BSKD = cache.update(layer_id, k_BTKD, v_BTKD)
            out_BTHD = _sdpa_masked(q_BTHD, k_BSKD, v_BSKD, cache.mask_BTS)
        return self.wo(out_BTHD.reshape(b, t, -1))


# ----------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of the positions decoded so far, for incremental decoding (used by
    megalite.generate; training never builds one).

    Slots 0..max_len-1 hold one token each, for every sequence of the batch. Prompts of different
    lengths are left-padded: sequence b's first `pad_B[b]` slots are padding, its token in slot s
    sits at position s - pad_B[b], and no real query ever attends to a padding slot. S below is
    the number of slots filled so far.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        pad_B: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k_LBSKD = torch.zeros(shape, dtype=dtype, device=device)
        self.v_LBSKD = torch.zeros(shape, dtype=dtype, device=device)
        self.pad_B = (
            torch.zeros(batch, dtype=torch.long, device=device)
            if pad_B is None
            else pad_B.to(device=device, dtype=torch.long)
        )
        self.max_len = max_len
        self.filled = 0
        # Set by `begin` for the tokens of the current forward.
        self.pos_BT = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.mask_BTS = torch.zeros(batch, 0, 0, dtype=torch.bool, device=device)

    def begin(self, t: int) -> None:
        """Positions and attention mask for the next t tokens (slots filled..filled+t-1)."""
        if self.filled + t > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots cannot take {t} more tokens")
        device = self.pad_B.device
        slots_T = torch.arange(self.filled, self.filled + t, device=device)
        keys_S = torch.arange(self.filled + t, device=device)
        self.pos_BT = (slots_T[None, :] - self.pad_B[:, None]).clamp(min=0)
        causal_TS = keys_S[None, :] <= slots_T[:, None]
        real_BS = keys_S[None, :] >= self.pad_B[:, None]
        # A padding query sees only itself: an all-masked row would give NaN, and NaN values in
        # padding slots would leak into real rows (0 * NaN) in the next layer.
        own_TS = keys_S[None, :] == slots_T[:, None]
        self.mask_BTS = causal_TS[None] & (real_BS[:, None, :] | own_TS[None])

    def update(
        self, layer_id: int, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this layer's new keys and values; returns all of them so far (B, S, K, D)."""
        end = self.filled + k_BTKD.shape[1]
        self.k_LBSKD[layer_id, :, self.filled : end] = k_BTKD
        self.v_LBSKD[layer_id, :, self.filled : end] = v_BTKD
        return self.k_LBSKD[layer_id, :, :end], self.v_LBSKD[layer_id, :, :end]

    def advance(self, t: int) -> None:
        self.filled += t


# ---------------------------------------------------------------------------------------- MLP
class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), Llama's feed-forward block."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTC)) * self.w3(x_BTC))
