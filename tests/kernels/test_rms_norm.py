"""RMSNorm kernel vs the fp32 reference, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
from megalite.kernels import reference
from megalite.kernels.rms_norm import rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pytorch_low_precision(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written in plain PyTorch and run in the input dtype, with no upcast."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 21, 100), (37, 264), (5, 33)], ids=str)
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, check_close) -> None:
    eps = 1e-6
    hidden = shape[-1]
    x = (torch.randn(shape) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden)).to(dtype)
    dy = torch.randn(shape).to(dtype)

    xk, wk = _leaves(x, w)
    yk = rms_norm(xk, wk, eps)
    yk.backward(dy)
    assert yk.dtype == dtype and xk.grad.dtype == dtype and wk.grad.dtype == dtype

    x32, w32 = _leaves(x.float(), w.float())
    y32 = reference.rms_norm(x32, w32, eps)
    y32.backward(dy.float())

    xp, wp = _leaves(x, w)
    yp = _pytorch_low_precision(xp, wp, eps)
    yp.backward(dy)

    check_close("y", yk, y32, yp, dtype)
    check_close("dx", xk.grad, x32.grad, xp.grad, dtype)
    check_close("dweight", wk.grad, w32.grad, wp.grad, dtype)


def test_fp32_weight_with_bf16_input(check_close) -> None:
    """Mixed precision keeps the norm weight in fp32: output and dx in bf16, dweight in fp32."""
    x = torch.randn(9, 70).to(torch.bfloat16)
    w = 1 + 0.5 * torch.randn(70)
    dy = torch.randn(9, 70).to(torch.bfloat16)
    xk, wk = _leaves(x, w)
    yk = rms_norm(xk, wk)
    yk.backward(dy)
    assert (yk.dtype, xk.grad.dtype, wk.grad.dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.float32,
    )
    x32, w32 = _leaves(x.float(), w)
    y32 = reference.rms_norm(x32, w32)
    y32.backward(dy.float())
    xp, wp = _leaves(x, w.to(torch.bfloat16))
    yp = _pytorch_low_precision(xp, wp, 1e-6)
    yp.backward(dy)
    check_close("y", yk, y32, yp, torch.bfloat16)
    check_close("dx", xk.grad, x32.grad, xp.grad, torch.bfloat16)
    check_close("dweight", wk.grad, w32.grad, wp.grad, torch.bfloat16)


def test_eps_is_used() -> None:
    """A large eps must change the output exactly as the reference says (guards a dropped eps)."""
    x = torch.randn(4, 48) * 0.01
    w = torch.ones(48)
    for eps in (1e-6, 1.0):
        torch.testing.assert_close(rms_norm(x, w, eps), reference.rms_norm(x, w, eps))


@pytest.mark.parametrize(
    ("make_args", "error", "match"),
    [
        (
            lambda: (torch.randn(4, 8), torch.randn(7)),
            ValueError,
            r"x.shape=\(4, 8\) must end in weight's size 7",
        ),
        (lambda: (torch.randn(4, 8), torch.randn(2, 4)), ValueError, r"weight must have 1 dims"),
        (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(8)), TypeError, r"x.dtype=torch.int64"),
        (lambda: (torch.randn(8, 4).t(), torch.randn(8)), ValueError, r"x must be contiguous"),
        (lambda: ([1.0, 2.0], torch.randn(2)), TypeError, r"x must be a torch.Tensor, got list"),
        (
            lambda: (torch.randn(4, 8, device="meta"), torch.randn(8, device="meta")),
            ValueError,
            r"x is on meta",
        ),
    ],
    ids=[
        "hidden-mismatch",
        "weight-2d",
        "int-input",
        "non-contiguous",
        "not-a-tensor",
        "wrong-device",
    ],
)
def test_bad_inputs_raise_clear_errors(make_args, error, match) -> None:
    with pytest.raises(error, match=match):
        rms_norm(*make_args())
