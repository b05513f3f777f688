"""Flash attention (FlashAttention-2 schedule) with grouped-query heads, forward and backward.

Math, per batch b and query head h with kv head g = h // (H / K) and scale s:

    S = s * Q K^T   (causal: S[i, j] = -inf for j > i)     P = softmax(S)     O = P V
    forward keeps per row m (running max) and l (running sum) and rescales the O accumulator per
    key block (online softmax), then stores O and lse = m + log2(l) in base-2 units;
    backward: D = rowsum(dO * O), P = exp2(s' Q K^T - lse) recomputed from lse,
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = s dS K,  dK = s dS^T Q,
    with dK and dV of a kv head summed over the H / K query heads that share it.

Memory traffic: eager attention writes and reads the B x H x T x T scores and probabilities
(several passes, and autograd keeps P for backward: 4 B x H x T^2 bytes in fp32). Here S and P live
only in registers/shared memory, one (BLOCK_M x BLOCK_N) tile at a time; HBM traffic is reading
Q, K, V (K and V once per query block) and writing O plus one float per row. The backward saves
only O and lse, recomputes P tile by tile, and writes dQ, dK, dV once each without atomics: one
kernel owns a key block and loops over the query heads of its group for dK/dV, another owns a
query block for dQ.

Layouts: q and the output are (B, T, H, D); k and v are (B, T, K, D), any strides with a
contiguous last dim; lse is (B, H, T).

Shape legend: B batch, T sequence, H query heads, K kv heads, D head dim,
M query rows per block, N key rows per block.
"""

from __future__ import annotations

import math

import torch

# Importing the two passes registers the megalite::flash_attention_fwd / _bwd ops the autograd
# Function calls.
from megalite.kernels import flash_attention_bwd  # noqa: F401
from megalite.kernels._utils import cast_for_autocast, check_same_device, check_tensor
from megalite.kernels.flash_attention_fwd import SUPPORTED_HEAD_DIMS

OP = "flash_attention"


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q_BTHD: torch.Tensor,
        k_BTKD: torch.Tensor,
        v_BTKD: torch.Tensor,
        causal: bool,
        softmax_scale: float,
    ) -> torch.Tensor:
        o_BTHD, lse_BHT = torch.ops.megalite.flash_attention_fwd(
            q_BTHD, k_BTKD, v_BTKD, causal, softmax_scale
        )
        ctx.save_for_backward(q_BTHD, k_BTKD, v_BTKD, o_BTHD, lse_BHT)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return o_BTHD

    @staticmethod
    def backward(
        ctx, do_BTHD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q_BTHD, k_BTKD, v_BTKD, o_BTHD, lse_BHT = ctx.saved_tensors
        dq, dk, dv = torch.ops.megalite.flash_attention_bwd(
            do_BTHD, q_BTHD, k_BTKD, v_BTKD, o_BTHD, lse_BHT, ctx.causal, ctx.softmax_scale
        )
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q (B, T, H, D) over k, v (B, T, K, D), H a multiple of K (GQA).

    Returns (B, T, H, D) in q's dtype; ``softmax_scale`` defaults to 1/sqrt(D). Matches
    ``megalite.kernels.reference.attention``. Head dims: 32, 64, 128. Under autocast q, k, v
    are cast to the autocast dtype first, as ``F.scaled_dot_product_attention`` does.
    """
    q, k, v = cast_for_autocast(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4, contiguous=False)
        if t.stride(-1) != 1:
            raise ValueError(
                f"{OP}: {name} must be contiguous in its last (head_dim) dim, got strides "
                f"{t.stride()}; call .contiguous() first"
            )
    check_same_device(OP, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must match")
    batch, seqlen, n_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seqlen or k.shape[3] != head_dim:
        raise ValueError(
            f"{OP}: k.shape={tuple(k.shape)} must be ({batch}, {seqlen}, kv_heads, {head_dim}) "
            f"to match q.shape={tuple(q.shape)}"
        )
    n_kv_heads = k.shape[2]
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(
            f"{OP}: query heads {n_heads} must be a multiple of kv heads {n_kv_heads} "
            f"(q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)})"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{OP}: head_dim={head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}"
        )
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(softmax_scale, (int, float)) or softmax_scale <= 0:
        raise ValueError(f"{OP}: softmax_scale={softmax_scale!r} must be a positive float or None")
    return FlashAttentionFunction.apply(q, k, v, bool(causal), float(softmax_scale))


__all__ = ["flash_attention", "FlashAttentionFunction", "SUPPORTED_HEAD_DIMS"]
