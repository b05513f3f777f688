"""Fused output projection + cross-entropy, chunked over tokens: the N x V logits never exist.

Math: ``loss = CE(hidden (N, C) @ weight (V, C).T, target)``. For each chunk of R rows:

    logits_RV = hidden_RC @ weight.T              (cuBLAS, in the input dtype)
    loss_R, lse_R, and in place dlogits_RV = s * (softmax(logits_RV) - onehot(target_R))
                                                   (one Triton launch: ``_ce_fwd_kernel`` with
                                                    WRITE_GRAD, see cross_entropy.py)
    grad_hidden_RC  = dlogits_RV @ weight
    grad_weight_VC += dlogits_RV.T @ hidden_RC     (fp32 accumulator across chunks)

For "mean" and "sum" the gradients are computed during the forward, with ``s`` = 1/n_valid or 1,
and the backward only multiplies them by the upstream scalar gradient: three matmuls in total, the
same as unfused autograd. For "none" the upstream gradient is per row and unknown in the forward,
so the forward only computes losses and the backward recomputes each chunk's logits with the
per-row scale (four matmuls). A forward without gradients (eval, no_grad) skips the gradient work.

Memory: the unfused path holds N x V logits, an fp32 copy for the softmax and an N x V gradient —
at N = 8192 tokens and V = 128K in bf16 that is 2 GiB + 4 GiB + 2 GiB. The fused path holds one
R x V chunk (at least Liger-Kernel's size, about that of ``hidden``; at most 8 chunks while one
stays under 256 MiB, since every chunk re-reads and re-writes the weight gradient), the N x C and
V x C gradients that autograd needs anyway, and a V x C fp32 accumulator while the forward runs
for bf16/fp16 weights (accumulating in bf16 would add one rounding per chunk).

Not for vocab-sharded (tensor-parallel) output layers: the softmax normalizer would need an
all-reduce across the shards; megalite's config refuses that combination.

Shape legend: N tokens, C hidden size, V vocab, R rows per chunk.
"""

from __future__ import annotations

import torch
import triton
from megalite.kernels._utils import (
    autocast_off,
    cast_for_autocast,
    check_reduction,
    check_same_device,
    check_tensor,
)
from megalite.kernels.cross_entropy import check_target, forward_rows, reduce_loss

OP = "fused_linear_cross_entropy"


# Each chunk re-reads and re-writes the V x C weight-gradient accumulator, so tiny chunks turn the
# backward into memory traffic; a few larger chunks cost little memory next to the full logits.
MAX_CHUNKS = 8
CHUNK_BUDGET_BYTES = 256 * 2**20


def chunk_rows(n_rows: int, vocab: int, hidden: int, elem_size: int) -> int:
    """Rows per chunk of logits: at least Liger-Kernel's rule (a chunk about as large as
    ``hidden``), raised towards ``MAX_CHUNKS`` chunks while a chunk stays within
    ``CHUNK_BUDGET_BYTES``."""
    memory_rows = triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab, hidden)))
    budget_rows = max(1, CHUNK_BUDGET_BYTES // (vocab * elem_size))
    few_chunks_rows = min(triton.next_power_of_2(triton.cdiv(n_rows, MAX_CHUNKS)), budget_rows)
    return max(memory_rows, few_chunks_rows)


def _accumulate_grad_weight(
    acc_VC: torch.Tensor, dlogits_RV: torch.Tensor, hidden_RC: torch.Tensor
) -> None:
    """acc_VC (fp32) += dlogits_RV.T @ hidden_RC, without a V x C temporary where possible."""
    if dlogits_RV.dtype == acc_VC.dtype:
        acc_VC.addmm_(dlogits_RV.t(), hidden_RC)
    elif acc_VC.is_cuda:
        # bf16/fp16 tensor-core GEMM accumulating into the fp32 output in its epilogue.
        torch.addmm(acc_VC, dlogits_RV.t(), hidden_RC, out_dtype=torch.float32, out=acc_VC)
    else:
        # CPU (the interpreter) has no mixed-dtype addmm: one rounded partial per chunk, summed
        # in fp32.
        acc_VC.add_(dlogits_RV.t() @ hidden_RC)


def _chunked_pass(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int,
    loss_N: torch.Tensor,
    grad_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Loss per row into ``loss_N``; with ``grad_scale`` ((1,) shared or (N,) per row) also
    returns (grad_hidden, grad_weight)."""
    n_rows, n_hidden = hidden_NC.shape
    vocab = weight_VC.shape[0]
    lse_N = torch.empty(n_rows, dtype=torch.float32, device=hidden_NC.device)
    want_grad = grad_scale is not None
    if want_grad:
        grad_hidden_NC = torch.empty_like(hidden_NC)
        grad_weight_acc_VC = torch.zeros(
            vocab, n_hidden, dtype=torch.float32, device=weight_VC.device
        )
    rows = chunk_rows(n_rows, vocab, n_hidden, hidden_NC.element_size())
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        hidden_RC = hidden_NC[start:end]
        logits_RV = hidden_RC @ weight_VC.t()
        scale = None
        if want_grad:
            scale = grad_scale[start:end] if grad_scale.shape[0] == n_rows else grad_scale
        forward_rows(
            logits_RV, target_N[start:end], ignore_index, loss_N[start:end], lse_N[start:end], scale
        )
        if want_grad:
            dlogits_RV = logits_RV  # overwritten in place by the kernel
            torch.mm(dlogits_RV, weight_VC, out=grad_hidden_NC[start:end])
            _accumulate_grad_weight(grad_weight_acc_VC, dlogits_RV, hidden_RC)
    if not want_grad:
        return None
    return grad_hidden_NC, grad_weight_acc_VC.to(weight_VC.dtype)


def _grad_factor(target_N: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=target_N.device)
    n_valid = (target_N != ignore_index).sum().to(torch.float32)
    return (1.0 / n_valid).reshape(1)


@torch.library.custom_op("megalite::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int,
    reduction: str,
    compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The caller's autocast (also live inside compiled graphs and backward) would run the chunk
    # GEMMs in bf16 against fp32 buffers; fused_linear_cross_entropy has cast the inputs already.
    with autocast_off(hidden_NC.device):
        loss_N = torch.empty(hidden_NC.shape[0], dtype=torch.float32, device=hidden_NC.device)
        if not compute_grads:
            _chunked_pass(hidden_NC, weight_VC, target_N, ignore_index, loss_N, None)
            return loss_N, hidden_NC.new_empty(0), weight_VC.new_empty(0)
        factor = _grad_factor(target_N, ignore_index, reduction)
        grads = _chunked_pass(hidden_NC, weight_VC, target_N, ignore_index, loss_N, factor)
        assert grads is not None
        return loss_N, grads[0], grads[1]


@_flce_fwd.register_fake
def _(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    target_N: torch.Tensor,
    ignore_index: int,
    reduction: str,
    compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_N = hidden_NC.new_empty(hidden_NC.shape[0], dtype=torch.float32)
    if not compute_grads:
        return loss_N, hidden_NC.new_empty(0), weight_VC.new_empty(0)
    return loss_N, torch.empty_like(hidden_NC), torch.empty_like(weight_VC)


@torch.library.custom_op("megalite::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    target_N: torch.Tensor,
    grad_loss_N: torch.Tensor,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast_off(hidden_NC.device):
        loss_N = torch.empty(hidden_NC.shape[0], dtype=torch.float32, device=hidden_NC.device)
        grads = _chunked_pass(
            hidden_NC, weight_VC, target_N, ignore_index, loss_N, grad_loss_N.float().contiguous()
        )
        assert grads is not None
        return grads


@_flce_bwd.register_fake
def _(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    target_N: torch.Tensor,
    grad_loss_N: torch.Tensor,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(hidden_NC), torch.empty_like(weight_VC)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_NC: torch.Tensor,
        weight_VC: torch.Tensor,
        target_N: torch.Tensor,
        ignore_index: int,
        reduction: str,
        needs_grad: bool,
    ) -> torch.Tensor:
        ctx.grads_in_forward = needs_grad and reduction != "none"
        ctx.ignore_index = ignore_index
        loss_N, grad_hidden_NC, grad_weight_VC = torch.ops.megalite.fused_linear_cross_entropy_fwd(
            hidden_NC, weight_VC, target_N, ignore_index, reduction, ctx.grads_in_forward
        )
        if ctx.grads_in_forward:
            ctx.save_for_backward(grad_hidden_NC, grad_weight_VC)
        else:
            ctx.save_for_backward(hidden_NC, weight_VC, target_N)
        loss, _ = reduce_loss(loss_N, target_N, ignore_index, reduction)
        return loss

    @staticmethod
    def backward(
        ctx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        if ctx.grads_in_forward:
            grad_hidden_NC, grad_weight_VC = ctx.saved_tensors
            return grad_hidden_NC * grad_loss, grad_weight_VC * grad_loss, None, None, None, None
        hidden_NC, weight_VC, target_N = ctx.saved_tensors
        grad_hidden_NC, grad_weight_VC = torch.ops.megalite.fused_linear_cross_entropy_bwd(
            hidden_NC, weight_VC, target_N, grad_loss, ctx.ignore_index
        )
        return grad_hidden_NC, grad_weight_VC, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``cross_entropy(hidden (N, C) @ weight (V, C).T, target (N,))`` without the N x V logits.

    Same result as ``megalite.kernels.reference.fused_linear_cross_entropy``: logits in the input
    dtype, softmax in fp32, an fp32 loss; gradients for hidden and weight in their dtypes. Under
    autocast the projection runs in the autocast dtype, as ``F.linear`` would (fp32 master weights
    and residual stream in, bf16 GEMMs, fp32 gradients out).
    """
    check_tensor(OP, "hidden", hidden, ndim=2)
    check_tensor(OP, "weight", weight, ndim=2)
    check_target(OP, target, hidden.shape[0], "hidden")
    check_same_device(OP, hidden=hidden, weight=weight, target=target)
    hidden, weight = cast_for_autocast(hidden, weight)
    check_reduction(OP, reduction)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{OP}: weight.shape={tuple(weight.shape)} must be (vocab, {hidden.shape[1]}) to match "
            f"hidden.shape={tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{OP}: hidden.dtype={hidden.dtype} and weight.dtype={weight.dtype} must match"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    # Decided here, not in forward(): inside an autograd.Function's forward grad mode is always
    # off, so an eval pass under no_grad with trainable weights would still pay for gradients.
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, target, ignore_index, reduction, needs_grad
    )


__all__ = ["fused_linear_cross_entropy", "FusedLinearCrossEntropyFunction", "chunk_rows"]
