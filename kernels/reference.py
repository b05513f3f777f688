"""Pure-PyTorch references for every fused kernel; the model's CPU path uses these.

Every function computes in fp32 internally and returns the input dtype, which is what the Triton
kernels do (fp32 accumulation), so kernel-vs-reference comparisons isolate the kernel's own error.

Shape legend: B batch, T sequence, H query heads, K kv heads, D head dim, C hidden, V vocab, N rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x**2, -1) + eps) * weight, normalized in fp32."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token-level cross-entropy over (N, V) logits in fp32; "mean" averages non-ignored tokens."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean', 'sum' or 'none'")
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden (N, C) @ weight (V, C).T, target): the unfused reference."""
    logits_NV = hidden @ weight.t()
    return cross_entropy(logits_NV, target, ignore_index=ignore_index, reduction=reduction)


def attention(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Grouped-query softmax attention in fp32; inputs and output are (B, T, heads, D)."""
    n_heads, n_kv = q_BTHD.shape[2], k_BTKD.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} must be a multiple of kv heads {n_kv}")
    rep = n_heads // n_kv
    q = q_BTHD.float().transpose(1, 2)
    k = k_BTKD.float().repeat_interleave(rep, dim=2).transpose(1, 2)
    v = v_BTKD.float().repeat_interleave(rep, dim=2).transpose(1, 2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        t_q, t_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).to(q_BTHD.dtype)
