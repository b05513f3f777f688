"""Every kernel under bf16 autocast (CPU autocast, Triton interpreter), forward and backward.

Training runs the model under ``torch.autocast``; the kernels must behave there as the PyTorch op
they replace does: the matmul ops (attention as SDPA, the fused linear-CE's projection as
``F.linear``) compute in the autocast dtype, the norm and the cross-entropy are fp32 inside and
keep their input dtype. Inputs are fp32 leaves, as the model's master weights and residual
stream are. Each check: the same output and gradient dtypes as the PyTorch path under autocast,
and an error against the fp32 reference at most twice that path's (``check_close``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megalite.kernels import reference
from megalite.kernels.cross_entropy import cross_entropy
from megalite.kernels.flash_attention import flash_attention
from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megalite.kernels.rms_norm import rms_norm

BF16 = torch.bfloat16


def _autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=BF16)


def _run(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor | None, autocast: bool):
    """(output, input grads) of fn on fresh leaf copies; backward outside autocast, as the
    trainer calls it."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    if autocast:
        with _autocast():
            out = fn(*leaves)
    else:
        out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves if leaf.requires_grad]


def _check(name, fn_kernel, fn_torch, inputs, grad_out, check_close) -> None:
    out_k, grads_k = _run(fn_kernel, inputs, grad_out, autocast=True)
    out_t, grads_t = _run(fn_torch, inputs, grad_out, autocast=True)  # PyTorch's own bf16 path
    out_32, grads_32 = _run(fn_torch, inputs, grad_out, autocast=False)  # fp32 reference
    assert out_k.dtype == out_t.dtype, f"{name}: output {out_k.dtype}, PyTorch gives {out_t.dtype}"
    check_close(f"{name} out", out_k.float(), out_32, out_t.float(), BF16)
    for i, (g_k, g_t, g_32) in enumerate(zip(grads_k, grads_t, grads_32, strict=True)):
        assert g_k.dtype == g_t.dtype == inputs[i].dtype, f"{name}: grad {i} dtype {g_k.dtype}"
        check_close(f"{name} grad {i}", g_k, g_32, g_t, BF16)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_under_autocast(reduction: str, check_close) -> None:
    """The crash of issue 13: the projection comes out bf16 under autocast."""
    n_rows, hidden, vocab = 21, 32, 150
    h = torch.randn(n_rows, hidden)
    w = torch.randn(vocab, hidden) / hidden**0.25
    target = torch.randint(0, vocab, (n_rows,))
    target[2::5] = -100
    grad = torch.randn(n_rows) if reduction == "none" else None
    _check(
        "fused_linear_cross_entropy",
        lambda h, w: fused_linear_cross_entropy(h, w, target, reduction=reduction),
        lambda h, w: reference.fused_linear_cross_entropy(h, w, target, reduction=reduction),
        [h, w],
        grad,
        check_close,
    )


def test_flash_attention_under_autocast(check_close) -> None:
    """Like SDPA under autocast: fp32 q, k, v run (and come out) in bf16."""
    q = torch.randn(1, 37, 4, 32)
    k, v = torch.randn(1, 37, 2, 32), torch.randn(1, 37, 2, 32)

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    _check(
        "flash_attention", flash_attention, sdpa, [q, k, v], torch.randn(1, 37, 4, 32), check_close
    )


def test_rms_norm_under_autocast(check_close) -> None:
    x, w = torch.randn(2, 7, 48), 1 + 0.1 * torch.randn(48)
    _check("rms_norm", rms_norm, reference.rms_norm, [x, w], torch.randn(2, 7, 48), check_close)


def test_cross_entropy_under_autocast(check_close) -> None:
    """bf16 logits from an autocast matmul, as the unfused loss path sees them."""
    logits = torch.randn(19, 150)
    target = torch.randint(0, 150, (19,))
    target[::4] = -100

    def via(ce):
        return lambda x: ce((x * 1.0) @ torch.eye(150), target)  # an autocast op: bf16 logits

    _check(
        "cross_entropy",
        via(cross_entropy),
        via(reference.cross_entropy),
        [logits],
        None,
        check_close,
    )
