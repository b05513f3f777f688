"""Fused RMSNorm: one Triton kernel forward, one backward.

Math, per row x of length C (fp32 inside the kernel whatever the input dtype):

    rstd = 1 / sqrt(mean(x**2) + eps)          y = x * rstd * w
    x_hat = x * rstd                            dw = sum_rows(dy * x_hat)
    dx = rstd * (dy * w - x_hat * mean(dy * w * x_hat))

Memory traffic: eager PyTorch (upcast, pow, mean, rsqrt, mul, mul, downcast) reads and writes an
N x C tensor about seven times forward and more backward, plus the fp32 temporaries autograd keeps.
The fused forward reads x and w once and writes y plus one fp32 ``rstd`` per row; the backward
reads x and dy once and writes dx once, with dw reduced in per-program fp32 partials (one wave of
programs, each looping over its rows) and a tiny final sum. Saved for backward: x, w, N floats.

Shape legend: N rows (all leading dims flattened), C hidden size, P backward programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megalite.kernels._utils import check_same_device, check_tensor, num_programs_cap

OP = "rms_norm"
MAX_HIDDEN = 16384  # one row is one block; wider rows would spill registers heavily


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    # Convert right after loading: arithmetic on bf16 must happen in fp32 (and the interpreter
    # would otherwise operate on raw bf16 bits).
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK_C: tl.constexpr,
):
    # int64 loop bounds make the row offsets 64-bit on GPU (the interpreter yields Python ints).
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    # Each program owns a contiguous run of rows, so dw needs one fp32 partial per program instead
    # of a (N, C) buffer or atomics.
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        # w is re-read per row (an L1/L2 hit) rather than held across the loop: with x, dy and
        # dw_acc live, a 16K-wide row would otherwise spill registers.
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = x * rstd
        wdy = w * dy
        c = tl.sum(x_hat * wdy, axis=0) / n_cols
        dx = (wdy - x_hat * c) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def launch_params(n_cols: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for a hidden size: more warps for wider rows keep registers per thread
    bounded (at 16 warps a 16K row spills in the backward); the AOT test compiles each row."""
    block = triton.next_power_of_2(n_cols)
    if block >= 16384:
        return block, 32
    if block >= 8192:
        return block, 16
    if block >= 2048:
        return block, 8
    return block, 4


@torch.library.custom_op("megalite::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x_NC: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x_NC.shape
    y_NC = torch.empty_like(x_NC)
    rstd_N = torch.empty(n_rows, dtype=torch.float32, device=x_NC.device)
    block, num_warps = launch_params(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x_NC,
        weight,
        y_NC,
        rstd_N,
        x_NC.stride(0),
        y_NC.stride(0),
        n_cols,
        eps,
        BLOCK_C=block,
        num_warps=num_warps,
    )
    return y_NC, rstd_N


@_rms_norm_fwd.register_fake
def _(x_NC: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x_NC), x_NC.new_empty(x_NC.shape[0], dtype=torch.float32)


@torch.library.custom_op("megalite::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy_NC: torch.Tensor, x_NC: torch.Tensor, weight: torch.Tensor, rstd_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x_NC.shape
    dy_NC = dy_NC.contiguous()
    dx_NC = torch.empty_like(x_NC)
    n_programs = max(1, min(n_rows, num_programs_cap()))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dw_partial_PC = torch.empty(n_programs, n_cols, dtype=torch.float32, device=x_NC.device)
    block, num_warps = launch_params(n_cols)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy_NC,
        x_NC,
        weight,
        rstd_N,
        dx_NC,
        dw_partial_PC,
        dy_NC.stride(0),
        x_NC.stride(0),
        dx_NC.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        BLOCK_C=block,
        num_warps=num_warps,
    )
    return dx_NC, dw_partial_PC.sum(0).to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(
    dy_NC: torch.Tensor, x_NC: torch.Tensor, weight: torch.Tensor, rstd_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x_NC), torch.empty_like(weight)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NC: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y_NC, rstd_N = torch.ops.megalite.rms_norm_fwd(x_NC, weight, eps)
        ctx.save_for_backward(x_NC, weight, rstd_N)
        return y_NC

    @staticmethod
    def backward(ctx, dy_NC: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_NC, weight, rstd_N = ctx.saved_tensors
        dx_NC, dw = torch.ops.megalite.rms_norm_bwd(dy_NC, x_NC, weight, rstd_N)
        return dx_NC, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), scaled by ``weight`` of shape (C,).

    Matches ``megalite.kernels.reference.rms_norm``: fp32 statistics and math, output in x.dtype,
    gradients for x and weight in their own dtypes. Autocast changes nothing (as for torch's norms,
    which autocast keeps in fp32): no input is cast, the host code has no op autocast would touch.
    """
    check_tensor(OP, "x", x)
    check_tensor(OP, "weight", weight, ndim=1)
    check_same_device(OP, x=x, weight=weight)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{OP}: x.shape={tuple(x.shape)} must end in weight's size {weight.shape[0]}"
        )
    n_cols = weight.shape[0]
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"{OP}: hidden size {n_cols} exceeds the kernel's limit of {MAX_HIDDEN}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{OP}: eps={eps!r} must be a non-negative float")
    y_NC = RMSNormFunction.apply(x.view(-1, n_cols), weight, float(eps))
    return y_NC.view(x.shape)


__all__ = ["rms_norm", "RMSNormFunction", "launch_params"]
