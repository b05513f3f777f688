"""Flash attention's forward pass: the Triton kernel, its autotune table and the
`megalite::flash_attention_fwd` op that launches it; flash_attention.py states the math and holds
the autograd Function and the public function, flash_attention_bwd.py the backward.

Also the tiling helpers both passes use: the autotune configs per head dim, the interpreter's
config, and the constexprs that depend on the dtype.

Shape legend: B batch, T sequence, H query heads, K kv heads, D head dim,
M query rows per block, N key rows per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megalite.kernels._utils import INTERPRET, autotune_configs

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634


def tile(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    """One autotune candidate: the query x key tile and the launch shape."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


# Autotune candidates per head dim, kept to those that compile for sm_80 and sm_90 within shared
# memory and without register spills (tests/kernels/test_aot_compile.py checks every one).
# BLOCK_M must be a multiple of BLOCK_N in the forward: the causal split between unmasked and
# diagonal key blocks happens at a query-block boundary.
_SMALL_D_FWD = [tile(128, 64, 8, 3), tile(128, 64, 4, 3), tile(64, 64, 4, 4), tile(128, 128, 8, 2)]
_D128_FWD = [_SMALL_D_FWD[0], _SMALL_D_FWD[2], _SMALL_D_FWD[3]]
FWD_CONFIGS = {32: _SMALL_D_FWD, 64: _SMALL_D_FWD, 128: _D128_FWD}
# Small tiles under the interpreter so test sequences of ~50-130 span several blocks.
INTERPRETER_CONFIG = tile(32, 16, 4, 1)


def autotune_by_head_dim(table: dict[int, list[triton.Config]]) -> dict:
    """triton.autotune arguments: the union of a per-head-dim table, pruned to the row of the
    launch's HEAD_DIM before benchmarking."""
    union = list({id(c): c for row in table.values() for c in row}.values())

    def prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
        allowed = table.get(kwargs.get("HEAD_DIM"), [])  # type: ignore[arg-type]
        kept = [c for c in configs if any(c is a for a in allowed)]
        return kept or configs  # the interpreter's single config is in no row

    return {
        "configs": autotune_configs(union, INTERPRETER_CONFIG),
        "key": ["seqlen", "HEAD_DIM", "CAUSAL"],
        "prune_configs_by": {"early_config_prune": prune},
    }


def kernel_flags(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs that depend on the input dtype.

    UPCAST: the interpreter computes bf16 ``tl.dot`` on raw bits, so under it bf16 tiles are
    converted to fp32 before every dot; GPU builds keep bf16 tensor-core dots.
    DOT_PRECISION: fp32 inputs get IEEE fp32 dots (as PyTorch's default, no TF32); it has no effect
    on 16-bit operands.
    """
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def bth_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K_base,
    V_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        # K loaded transposed (D, N) so the score tile is a plain q @ kT.
        kT = tl.load(
            K_base + cols[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0
        )
        v = tl.load(
            V_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**autotune_by_head_dim(FWD_CONFIGS))
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    n_heads,
    n_rep,
    seqlen,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // n_rep
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key blocks that need no mask run in a loop without the where(); only the diagonal (causal)
    # or the ragged last block (non-causal) pays for masking.
    if CAUSAL:
        full_hi = start_m * BLOCK_M
        masked_hi = tl.minimum(full_hi + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        masked_hi = seqlen
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        0,
        full_hi,
        seqlen,
        qk_scale,
        BLOCK_N,
        False,
        CAUSAL,
        UPCAST,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K_base,
        V_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        full_hi,
        masked_hi,
        seqlen,
        qk_scale,
        BLOCK_N,
        True,
        CAUSAL,
        UPCAST,
        DOT_PRECISION,
    )

    acc = acc / l_i[:, None]
    tl.store(LSE + bh * seqlen + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )


@torch.library.custom_op("megalite::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen, n_heads, head_dim = q_BTHD.shape
    n_rep = n_heads // k_BTKD.shape[2]
    o_BTHD = torch.empty(q_BTHD.shape, dtype=q_BTHD.dtype, device=q_BTHD.device)
    lse_BHT = torch.empty(batch, n_heads, seqlen, dtype=torch.float32, device=q_BTHD.device)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(seqlen, meta["BLOCK_M"]), batch * n_heads

    _attn_fwd_kernel[grid](
        q_BTHD,
        k_BTKD,
        v_BTKD,
        o_BTHD,
        lse_BHT,
        *bth_strides(q_BTHD),
        *bth_strides(k_BTKD),
        *bth_strides(v_BTKD),
        *bth_strides(o_BTHD),
        n_heads,
        n_rep,
        seqlen,
        softmax_scale * LOG2E,
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        **kernel_flags(q_BTHD.dtype),
    )
    return o_BTHD, lse_BHT


@_flash_attention_fwd.register_fake
def _(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen, n_heads, _ = q_BTHD.shape
    return (
        q_BTHD.new_empty(q_BTHD.shape),
        q_BTHD.new_empty((batch, n_heads, seqlen), dtype=torch.float32),
    )
