"""Flash attention's backward pass: the preprocessing kernel (D = rowsum(dO * O)), the dK/dV
kernel (one program per key block, looping over the query heads of its kv group), the dQ kernel
(one program per query block), their autotune tables and the `megalite::flash_attention_bwd` op
that launches them. The math is in flash_attention.py.

Shape legend: B batch, T sequence, H query heads, K kv heads, D head dim,
M query rows per block, N key rows per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megalite.kernels.flash_attention_fwd import (
    LOG2E,
    autotune_by_head_dim,
    bth_strides,
    kernel_flags,
    tile,
)

# Autotune candidates per head dim (see flash_attention_fwd.py for how they were chosen).
_SMALL_D_DKDV = [tile(32, 128, 8, 3), tile(64, 128, 8, 2), tile(32, 64, 4, 3)]
BWD_DKDV_CONFIGS = {
    32: _SMALL_D_DKDV,
    64: _SMALL_D_DKDV,
    128: [tile(32, 64, 8, 3), tile(64, 64, 8, 2), tile(16, 128, 8, 3)],
}
_SMALL_D_DQ = [tile(128, 32, 4, 3), tile(64, 64, 4, 3), tile(128, 64, 8, 2)]
BWD_DQ_CONFIGS = {
    32: _SMALL_D_DQ,
    64: _SMALL_D_DQ,
    128: [tile(64, 32, 4, 3), tile(128, 32, 8, 3), _SMALL_D_DQ[2]],
}
PREPROCESS_BLOCK_M = 64


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    seqlen,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seqlen
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=row_ok,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + bh * seqlen + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seqlen)


@triton.autotune(**autotune_by_head_dim(BWD_DKDV_CONFIGS))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    n_heads,
    n_kv_heads,
    n_rep,
    seqlen,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    b = bk // n_kv_heads
    kvh = bk % n_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen

    k = tl.load(
        K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: query blocks that end before this key block never attend to it.
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    # Summing over the query heads of the group here is what makes GQA need no atomics.
    for g in range(n_rep):
        h = kvh * n_rep + g
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_heads + h) * seqlen
        for start_m in range(lo, seqlen, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen
            q = tl.load(
                Q_base + rows[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            do = tl.load(
                DO_base + rows[:, None] * stride_dot + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            keep = row_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :])
            pT = tl.where(keep, tl.math.exp2(sT * qk_scale - lse[None, :]), 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    out = b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(**autotune_by_head_dim(BWD_DQ_CONFIGS))
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    n_heads,
    n_rep,
    seqlen,
    qk_scale,
    sm_scale,
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
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * seqlen + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * seqlen + offs_m, mask=row_ok, other=0.0)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, seqlen)
    else:
        hi = seqlen
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        k = tl.load(
            K_base + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            V_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


@torch.library.custom_op("megalite::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    o_BTHD: torch.Tensor,
    lse_BHT: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seqlen, n_heads, head_dim = q_BTHD.shape
    n_kv_heads = k_BTKD.shape[2]
    n_rep = n_heads // n_kv_heads
    if do_BTHD.stride(-1) != 1:
        do_BTHD = do_BTHD.contiguous()
    delta_BHT = torch.empty_like(lse_BHT)
    dq_BTHD = torch.empty(q_BTHD.shape, dtype=q_BTHD.dtype, device=q_BTHD.device)
    dk_BTKD = torch.empty(k_BTKD.shape, dtype=k_BTKD.dtype, device=k_BTKD.device)
    dv_BTKD = torch.empty(v_BTKD.shape, dtype=v_BTKD.dtype, device=v_BTKD.device)
    flags = kernel_flags(q_BTHD.dtype)
    qk_scale = softmax_scale * LOG2E

    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen, PREPROCESS_BLOCK_M), batch * n_heads)](
        o_BTHD,
        do_BTHD,
        delta_BHT,
        *bth_strides(o_BTHD),
        *bth_strides(do_BTHD),
        n_heads,
        seqlen,
        HEAD_DIM=head_dim,
        BLOCK_M=PREPROCESS_BLOCK_M,
    )

    def grid_kv(meta: dict) -> tuple[int, int]:
        return triton.cdiv(seqlen, meta["BLOCK_N"]), batch * n_kv_heads

    _attn_bwd_dkdv_kernel[grid_kv](
        q_BTHD,
        k_BTKD,
        v_BTKD,
        do_BTHD,
        lse_BHT,
        delta_BHT,
        dk_BTKD,
        dv_BTKD,
        *bth_strides(q_BTHD),
        *bth_strides(k_BTKD),
        *bth_strides(v_BTKD),
        *bth_strides(do_BTHD),
        *bth_strides(dk_BTKD),
        n_heads,
        n_kv_heads,
        n_rep,
        seqlen,
        qk_scale,
        softmax_scale,
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        **flags,
    )

    def grid_q(meta: dict) -> tuple[int, int]:
        return triton.cdiv(seqlen, meta["BLOCK_M"]), batch * n_heads

    _attn_bwd_dq_kernel[grid_q](
        q_BTHD,
        k_BTKD,
        v_BTKD,
        do_BTHD,
        lse_BHT,
        delta_BHT,
        dq_BTHD,
        *bth_strides(q_BTHD),
        *bth_strides(k_BTKD),
        *bth_strides(v_BTKD),
        *bth_strides(do_BTHD),
        *bth_strides(dq_BTHD),
        n_heads,
        n_rep,
        seqlen,
        qk_scale,
        softmax_scale,
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        **flags,
    )
    return dq_BTHD, dk_BTKD, dv_BTKD


@_flash_attention_bwd.register_fake
def _(
    do_BTHD: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    o_BTHD: torch.Tensor,
    lse_BHT: torch.Tensor,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        q_BTHD.new_empty(q_BTHD.shape),
        k_BTKD.new_empty(k_BTKD.shape),
        v_BTKD.new_empty(v_BTKD.shape),
    )
