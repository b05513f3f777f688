"""Fused linear + cross-entropy vs the unfused fp32 reference, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megalite.kernels import fused_linear_cross_entropy as flce_module
from megalite.kernels import reference
from megalite.kernels.fused_linear_cross_entropy import chunk_rows, fused_linear_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
N_ROWS, HIDDEN, VOCAB = 37, 48, 300  # 5 chunks of 8 rows (the last one ragged)


def _inputs(dtype: torch.dtype, n_rows: int = N_ROWS, hidden: int = HIDDEN, vocab: int = VOCAB):
    h = torch.randn(n_rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.25).to(dtype)
    target = torch.randint(0, vocab, (n_rows,))
    target[1::5] = -100
    return h, w, target


def test_the_shapes_used_here_span_several_chunks() -> None:
    rows = chunk_rows(N_ROWS, VOCAB, HIDDEN, 4)
    assert 1 < rows < N_ROWS and N_ROWS % rows != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(reduction: str, dtype: torch.dtype, check_close) -> None:
    h, w, target = _inputs(dtype)
    grad = torch.randn(N_ROWS) if reduction == "none" else torch.tensor(0.6)

    hk, wk = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lk = fused_linear_cross_entropy(hk, wk, target, reduction=reduction)
    lk.backward(grad)
    assert lk.dtype == torch.float32 and hk.grad.dtype == dtype and wk.grad.dtype == dtype

    h32, w32 = (
        h.detach().float().clone().requires_grad_(),
        w.detach().float().clone().requires_grad_(),
    )
    l32 = reference.fused_linear_cross_entropy(h32, w32, target, reduction=reduction)
    l32.backward(grad)

    hp, wp = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lp = F.cross_entropy(hp @ wp.t(), target, reduction=reduction)  # PyTorch in the input dtype
    lp.backward(grad.to(dtype))

    check_close("loss", lk, l32, lp, dtype)
    check_close("dhidden", hk.grad, h32.grad, hp.grad, dtype)
    check_close("dweight", wk.grad, w32.grad, wp.grad, dtype)
    assert (hk.grad[target == -100] == 0).all()


def test_no_grad_forward_and_weight_only_grad(check_close) -> None:
    h, w, target = _inputs(torch.float32)
    ref = reference.fused_linear_cross_entropy(h, w, target)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, target), ref)
    wk = w.detach().clone().requires_grad_()
    fused_linear_cross_entropy(h, wk, target).backward()
    w32 = w.detach().clone().requires_grad_()
    reference.fused_linear_cross_entropy(h, w32, target).backward()
    torch.testing.assert_close(wk.grad, w32.grad)


def test_gradients_come_from_forward_for_mean_and_are_recomputed_for_none(monkeypatch) -> None:
    """mean/sum: one chunked pass (forward, gradients included); none: a second pass in backward."""
    calls: list[bool] = []
    real = flce_module._chunked_pass

    def spy(*args, **kwargs):
        calls.append(args[-1] is not None)  # whether this pass computes gradients
        return real(*args, **kwargs)

    monkeypatch.setattr(flce_module, "_chunked_pass", spy)
    h, w, target = _inputs(torch.float32)
    hk = h.detach().clone().requires_grad_()
    fused_linear_cross_entropy(hk, w, target, reduction="mean").backward()
    assert calls == [True]
    calls.clear()
    with torch.no_grad():  # eval with trainable inputs: no gradient work
        fused_linear_cross_entropy(hk, w, target, reduction="mean")
    assert calls == [False]
    calls.clear()
    fused_linear_cross_entropy(hk, w, target, reduction="none").sum().backward()
    assert calls == [False, True]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, any ATen op produces (the interpreter's own copies
    of kernel arguments are byte views, so bytes is the unit that compares)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("with_grad", [False, True], ids=["loss-only", "with-grads"])
def test_never_materializes_full_logits(with_grad: bool) -> None:
    """Every tensor the chunked pass creates is far smaller than N x V (here N x V is larger than
    hidden, weight and both gradients, so any full-logits buffer would show)."""
    n_rows, hidden, vocab = 100, 16, 300
    h, w, target = _inputs(torch.float32, n_rows, hidden, vocab)
    loss = torch.empty(n_rows)
    scale = torch.ones(1) if with_grad else None
    mode = _LargestTensor()
    with mode:
        flce_module._chunked_pass(h, w, target, -100, loss, scale)
    full_logits_bytes = n_rows * vocab * 4
    assert mode.largest < full_logits_bytes / 4, (mode.largest, full_logits_bytes)
    # ...while the mode did see the chunks of logits
    assert mode.largest >= chunk_rows(n_rows, vocab, hidden, 4) * vocab * 4
    torch.testing.assert_close(
        loss, reference.fused_linear_cross_entropy(h, w, target, reduction="none")
    )


@pytest.mark.parametrize(
    ("make_args", "kwargs", "error", "match"),
    [
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)),
            {},
            ValueError,
            r"weight.shape=\(10, 7\) must be \(vocab, 8\)",
        ),
        (
            lambda: (
                torch.randn(4, 8),
                torch.randn(10, 8).half(),
                torch.zeros(4, dtype=torch.long),
            ),
            {},
            TypeError,
            r"hidden.dtype=torch.float32 and weight.dtype=torch.float16",
        ),
        (
            lambda: (torch.randn(2, 4, 8), torch.randn(10, 8), torch.zeros(8, dtype=torch.long)),
            {},
            ValueError,
            r"hidden must have 2 dims",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)),
            {},
            ValueError,
            r"target.shape=\(3,\) must be \(4,\)",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(8, 10).t(), torch.zeros(4, dtype=torch.long)),
            {},
            ValueError,
            r"weight must be contiguous",
        ),
        (
            lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
            {"reduction": "max"},
            ValueError,
            r"reduction='max'",
        ),
    ],
    ids=[
        "hidden-mismatch",
        "dtype-mismatch",
        "3d-hidden",
        "target-rows",
        "non-contiguous-weight",
        "bad-reduction",
    ],
)
def test_bad_inputs_raise_clear_errors(make_args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(*make_args(), **kwargs)
