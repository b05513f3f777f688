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
import triton
import triton.language as tl
from megalite.kernels._utils import (
    INTERPRET,
    autotune_configs,
    cast_for_autocast,
    check_same_device,
    check_tensor,
)

OP = "flash_attention"
SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634


def _cfg(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


# Autotune candidates per head dim, kept to those that compile for sm_80 and sm_90 within shared
# memory and without register spills (tests/kernels/test_aot_compile.py checks every one).
# BLOCK_M must be a multiple of BLOCK_N in the forward: the causal split between unmasked and
# diagonal key blocks happens at a query-block boundary.
_SMALL_D_FWD = [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 4), _cfg(128, 128, 8, 2)]
_D128_FWD = [_SMALL_D_FWD[0], _SMALL_D_FWD[2], _SMALL_D_FWD[3]]
FWD_CONFIGS = {32: _SMALL_D_FWD, 64: _SMALL_D_FWD, 128: _D128_FWD}
_SMALL_D_DKDV = [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 3)]
BWD_DKDV_CONFIGS = {
    32: _SMALL_D_DKDV,
    64: _SMALL_D_DKDV,
    128: [_cfg(32, 64, 8, 3), _cfg(64, 64, 8, 2), _cfg(16, 128, 8, 3)],
}
_SMALL_D_DQ = [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2)]
BWD_DQ_CONFIGS = {
    32: _SMALL_D_DQ,
    64: _SMALL_D_DQ,
    128: [_cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3), _SMALL_D_DQ[2]],
}
# Small tiles under the interpreter so test sequences of ~50-130 span several blocks.
INTERPRETER_CONFIG = _cfg(32, 16, 4, 1)


def _autotune(table: dict[int, list[triton.Config]]) -> dict:
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


PREPROCESS_BLOCK_M = 64


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


@triton.autotune(**_autotune(FWD_CONFIGS))
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


@triton.autotune(**_autotune(BWD_DKDV_CONFIGS))
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


@triton.autotune(**_autotune(BWD_DQ_CONFIGS))
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


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


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
        *_strides(q_BTHD),
        *_strides(k_BTKD),
        *_strides(v_BTKD),
        *_strides(o_BTHD),
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
        *_strides(o_BTHD),
        *_strides(do_BTHD),
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
        *_strides(q_BTHD),
        *_strides(k_BTKD),
        *_strides(v_BTKD),
        *_strides(do_BTHD),
        *_strides(dk_BTKD),
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
        *_strides(q_BTHD),
        *_strides(k_BTKD),
        *_strides(v_BTKD),
        *_strides(do_BTHD),
        *_strides(dq_BTHD),
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


__all__ = [
    "flash_attention",
    "FlashAttentionFunction",
    "FWD_CONFIGS",
    "BWD_DKDV_CONFIGS",
    "BWD_DQ_CONFIGS",
    "SUPPORTED_HEAD_DIMS",
]
