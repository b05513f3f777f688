"""Cross-entropy kernel vs the fp32 reference, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megalite.kernels import reference
from megalite.kernels.cross_entropy import cross_entropy

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def _targets(n_rows: int, vocab: int, ignore_index: int) -> torch.Tensor:
    target = torch.randint(0, vocab, (n_rows,))
    target[::4] = ignore_index  # every fourth token is padding
    return target


# vocab 300 spans three interpreter blocks of 128 with a ragged last one; 97 fits in one block.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("n_rows", "vocab"), [(37, 300), (13, 97)], ids=["37x300", "13x97"])
def test_matches_reference(
    n_rows: int, vocab: int, reduction: str, dtype: torch.dtype, check_close
) -> None:
    logits = (4 * torch.randn(n_rows, vocab)).to(dtype)
    target = _targets(n_rows, vocab, -100)
    grad = torch.randn(n_rows) if reduction == "none" else torch.tensor(1.7)

    xk = logits.detach().clone().requires_grad_()
    lk = cross_entropy(xk, target, reduction=reduction)
    lk.backward(grad)
    assert lk.dtype == torch.float32 and xk.grad.dtype == dtype

    x32 = logits.detach().float().clone().requires_grad_()
    l32 = reference.cross_entropy(x32, target, reduction=reduction)
    l32.backward(grad)

    xp = logits.detach().clone().requires_grad_()
    lp = F.cross_entropy(xp, target, reduction=reduction)  # PyTorch in the logits' dtype
    lp.backward(grad.to(dtype))

    check_close("loss", lk, l32, lp, dtype)
    check_close("dlogits", xk.grad, x32.grad, xp.grad, dtype)
    ignored = target == -100
    assert (xk.grad[ignored] == 0).all(), "ignored rows must get zero gradient"
    if reduction == "none":
        assert (lk[ignored] == 0).all()


def test_custom_ignore_index() -> None:
    """A real class id as ignore_index: those rows drop out of the loss and the mean's count."""
    logits = torch.randn(21, 130)
    target = torch.randint(0, 130, (21,))
    target[:7] = 5
    xk = logits.detach().clone().requires_grad_()
    x32 = logits.detach().clone().requires_grad_()
    loss = cross_entropy(xk, target, ignore_index=5)
    ref = reference.cross_entropy(x32, target, ignore_index=5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xk.grad, x32.grad)
    assert not torch.allclose(loss, reference.cross_entropy(logits, target)), (
        "ignore_index had no effect"
    )


def test_all_ignored_mean_is_nan_like_pytorch() -> None:
    logits = torch.randn(6, 40)
    target = torch.full((6,), -100)
    assert torch.isnan(cross_entropy(logits, target)) and torch.isnan(
        F.cross_entropy(logits, target)
    )
    assert cross_entropy(logits, target, reduction="sum").item() == 0.0


def test_large_logits_are_stable() -> None:
    """Online logsumexp must not overflow where a naive exp would (|logits| ~ 1e4 in fp32)."""
    logits = 1e4 * torch.randn(5, 300)
    target = torch.randint(0, 300, (5,))
    out = cross_entropy(logits, target, reduction="none")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.cross_entropy(logits, target, reduction="none"))


@pytest.mark.parametrize(
    ("make_args", "kwargs", "error", "match"),
    [
        (
            lambda: (torch.randn(4, 10), torch.zeros(5, dtype=torch.long)),
            {},
            ValueError,
            r"target.shape=\(5,\) must be \(4,\)",
        ),
        (
            lambda: (torch.randn(4, 10), torch.zeros(4)),
            {},
            TypeError,
            r"target.dtype=torch.float32",
        ),
        (
            lambda: (torch.randn(2, 4, 10), torch.zeros(8, dtype=torch.long)),
            {},
            ValueError,
            r"logits must have 2 dims",
        ),
        (
            lambda: (torch.randn(10, 4).t(), torch.zeros(4, dtype=torch.long)),
            {},
            ValueError,
            r"logits must be contiguous",
        ),
        (
            lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long)),
            {"reduction": "avg"},
            ValueError,
            r"reduction='avg'",
        ),
        (
            lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long)),
            {"ignore_index": 1.5},
            TypeError,
            r"ignore_index must be an int",
        ),
    ],
    ids=[
        "target-rows",
        "float-target",
        "3d-logits",
        "non-contiguous",
        "bad-reduction",
        "float-ignore-index",
    ],
)
def test_bad_inputs_raise_clear_errors(make_args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        cross_entropy(*make_args(), **kwargs)
