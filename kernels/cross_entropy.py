"""Fused cross-entropy over (N, V) logits: one Triton kernel forward, one backward.

Math, per row x of length V with target t (fp32 inside the kernel whatever the logits dtype):

    lse = log(sum_j exp(x_j))   (online: running max m and running sum s, one pass over V)
    loss = lse - x_t            (0 where t == ignore_index)
    dx_j = scale * (exp(x_j - lse) - [j == t])

``scale`` is the upstream gradient: ``g / n_valid`` for "mean", ``g`` for "sum", ``g[row]`` for
"none", and 0 for ignored rows.

Memory traffic: ``F.cross_entropy(logits.float())`` writes an fp32 copy of the logits, writes the
fp32 log-softmax, and its backward reads that and writes an fp32 gradient that is then cast back —
roughly five N x V passes forward and four backward, with N x V fp32 kept alive for backward. Here
the forward reads the logits once and writes two floats per row (loss, lse); the backward reads the
logits once and writes the gradient once, in the logits' dtype. Saved for backward: the logits
(which autograd holds anyway), the targets and N floats.

``_ce_fwd_kernel`` can also write the gradient over the logits in the same launch
(``WRITE_GRAD``); ``fused_linear_cross_entropy`` uses that on each chunk of logits it computes.

Shape legend: N rows (tokens), V vocab.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megalite.kernels._utils import (
    INDEX_DTYPES,
    INTERPRET,
    check_reduction,
    check_same_device,
    check_tensor,
)

OP = "cross_entropy"


@triton.jit
def _ce_fwd_kernel(
    LOGITS,
    TARGET,
    LOSS,
    LSE,
    SCALE,
    stride_logits,
    stride_scale,
    n_cols,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_logits
    target = tl.load(TARGET + row).to(tl.int64)
    valid = target != ignore_index

    # Online logsumexp: one read of the row, scalar running max/sum in fp32.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    # Out-of-range targets are not checked on the device (that would need a sync); masking the
    # load keeps them from reading outside the row.
    in_range = (target >= 0) & (target < n_cols)
    x_t = tl.load(base + target, mask=valid & in_range, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(LSE + row, lse)

    if WRITE_GRAD:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    LOGITS,
    DLOGITS,
    TARGET,
    LSE,
    SCALE,
    stride_logits,
    stride_dlogits,
    stride_scale,
    n_cols,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
    scale = tl.where(target != ignore_index, scale, 0.0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(LOGITS + row * stride_logits + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(DLOGITS + row * stride_dlogits + cols, g.to(DLOGITS.dtype.element_ty), mask=mask)


# The interpreter cap keeps BLOCK_V below the small test vocabularies so the multi-block loops and
# the partial last block run on CPU; on a GPU a 16K-wide block keeps the loop short for 128K vocabs.
MAX_BLOCK_V = 128 if INTERPRET else 16384


def launch_params(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocab size; the AOT test compiles the rows of this table."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    if block <= 2048:
        return block, 4
    if block <= 8192:
        return block, 8
    return block, 16


def forward_rows(
    logits_NV: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int,
    loss_N: torch.Tensor,
    lse_N: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Launch the forward kernel on validated, row-contiguous inputs; writes loss_N and lse_N.

    With ``grad_scale`` (shape (N,) or (1,) for a shared scale) the gradient overwrites
    ``logits_NV`` in place.
    """
    n_rows, n_cols = logits_NV.shape
    block, num_warps = launch_params(n_cols)
    write_grad = grad_scale is not None
    scale = grad_scale if write_grad else lse_N  # dummy pointer, never read
    stride_scale = scale.stride(0) if write_grad and scale.shape[0] == n_rows else 0
    _ce_fwd_kernel[(n_rows,)](
        logits_NV,
        target_N,
        loss_N,
        lse_N,
        scale,
        logits_NV.stride(0),
        stride_scale,
        n_cols,
        ignore_index,
        BLOCK_V=block,
        WRITE_GRAD=write_grad,
        num_warps=num_warps,
    )


@torch.library.custom_op("megalite::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = logits_NV.shape[0]
    loss_N = torch.empty(n_rows, dtype=torch.float32, device=logits_NV.device)
    lse_N = torch.empty(n_rows, dtype=torch.float32, device=logits_NV.device)
    forward_rows(logits_NV, target_N, ignore_index, loss_N, lse_N)
    return loss_N, lse_N


@_cross_entropy_fwd.register_fake
def _(
    logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = logits_NV.shape[0]
    return (
        logits_NV.new_empty(n_rows, dtype=torch.float32),
        logits_NV.new_empty(n_rows, dtype=torch.float32),
    )


@torch.library.custom_op("megalite::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    logits_NV: torch.Tensor,
    target_N: torch.Tensor,
    lse_N: torch.Tensor,
    scale_N: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    n_rows, n_cols = logits_NV.shape
    dlogits_NV = torch.empty_like(logits_NV)
    scale_N = scale_N.float()
    block, num_warps = launch_params(n_cols)
    _ce_bwd_kernel[(n_rows,)](
        logits_NV,
        dlogits_NV,
        target_N,
        lse_N,
        scale_N,
        logits_NV.stride(0),
        dlogits_NV.stride(0),
        scale_N.stride(0),
        n_cols,
        ignore_index,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return dlogits_NV


@_cross_entropy_bwd.register_fake
def _(
    logits_NV: torch.Tensor,
    target_N: torch.Tensor,
    lse_N: torch.Tensor,
    scale_N: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    return torch.empty_like(logits_NV)


def reduce_loss(
    loss_N: torch.Tensor, target_N: torch.Tensor, ignore_index: int, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reduced loss, per-row gradient factor of the reduction); no host sync for "mean"."""
    if reduction == "none":
        return loss_N, torch.ones_like(loss_N)
    if reduction == "sum":
        return loss_N.sum(), loss_N.new_ones(1)
    # "mean" over non-ignored rows, as F.cross_entropy: 0/0 = nan when every row is ignored.
    n_valid = (target_N != ignore_index).sum().to(torch.float32)
    return loss_N.sum() / n_valid, (1.0 / n_valid).reshape(1)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int, reduction: str
    ) -> torch.Tensor:
        loss_N, lse_N = torch.ops.megalite.cross_entropy_fwd(logits_NV, target_N, ignore_index)
        loss, factor = reduce_loss(loss_N, target_N, ignore_index, reduction)
        ctx.save_for_backward(logits_NV, target_N, lse_N, factor)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits_NV, target_N, lse_N, factor = ctx.saved_tensors
        scale_N = (grad_loss.float() * factor).expand(logits_NV.shape[0]).contiguous()
        dlogits_NV = torch.ops.megalite.cross_entropy_bwd(
            logits_NV, target_N, lse_N, scale_N, ctx.ignore_index
        )
        return dlogits_NV, None, None, None


def check_target(op: str, target: torch.Tensor, n_rows: int, what: str) -> None:
    check_tensor(op, "target", target, dtypes=INDEX_DTYPES, ndim=1)
    if target.shape[0] != n_rows:
        raise ValueError(
            f"{op}: target.shape={tuple(target.shape)} must be ({n_rows},), "
            f"one class per {what} row"
        )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) class indices, like ``F.cross_entropy``.

    The loss is fp32 for every logits dtype; the logits gradient has the logits' dtype. Targets
    equal to ``ignore_index`` contribute 0 and are left out of the "mean" denominator. Autocast
    changes nothing: the logits are read in their dtype and the math is fp32 either way.
    """
    check_tensor(OP, "logits", logits, ndim=2)
    check_target(OP, target, logits.shape[0], "logits")
    check_same_device(OP, logits=logits, target=target)
    check_reduction(OP, reduction)
    if not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction)


__all__ = ["cross_entropy", "CrossEntropyFunction", "forward_rows", "launch_params"]
