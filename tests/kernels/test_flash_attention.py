"""Flash attention kernels vs the fp32 reference, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
from megalite.kernels import reference
from megalite.kernels.flash_attention import flash_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pytorch_low_precision(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Attention in plain PyTorch, every op in the input dtype (flash-attention's upcast=False)."""
    rep = q.shape[2] // k.shape[2]
    q_ = q.transpose(1, 2)
    k_ = k.repeat_interleave(rep, dim=2).transpose(1, 2)
    v_ = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = (q_ @ k_.transpose(-2, -1)) * scale
    if causal:
        t = scores.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v_).transpose(1, 2)


def _run_and_check(batch, seqlen, n_heads, n_kv, head_dim, dtype, causal, check_close, scale=None):
    q = torch.randn(batch, seqlen, n_heads, head_dim).to(dtype)
    k = torch.randn(batch, seqlen, n_kv, head_dim).to(dtype)
    v = torch.randn(batch, seqlen, n_kv, head_dim).to(dtype)
    do = torch.randn(batch, seqlen, n_heads, head_dim).to(dtype)
    eff_scale = scale if scale is not None else head_dim**-0.5

    qk, kk, vk = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ok = flash_attention(qk, kk, vk, causal=causal, softmax_scale=scale)
    ok.backward(do)
    assert ok.dtype == dtype and ok.shape == q.shape

    q32, k32, v32 = (t.detach().float().clone().requires_grad_() for t in (q, k, v))
    o32 = reference.attention(q32, k32, v32, causal=causal, softmax_scale=scale)
    o32.backward(do.float())

    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    op = _pytorch_low_precision(qp, kp, vp, causal, eff_scale)
    op.backward(do)

    check_close("out", ok, o32, op, dtype)
    check_close("dq", qk.grad, q32.grad, qp.grad, dtype)
    check_close("dk", kk.grad, k32.grad, kp.grad, dtype)
    check_close("dv", vk.grad, v32.grad, vp.grad, dtype)


# Sequence lengths are not multiples of the interpreter's 32x16 tiles.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("n_heads", "n_kv"), [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "gqa4"])
def test_head_dim_64(
    n_heads: int, n_kv: int, causal: bool, dtype: torch.dtype, check_close
) -> None:
    _run_and_check(2, 53, n_heads, n_kv, 64, dtype, causal, check_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_head_dim_128(causal: bool, dtype: torch.dtype, check_close) -> None:
    _run_and_check(1, 45, 4, 2, 128, dtype, causal, check_close)


def test_head_dim_32_long_ragged_sequence_custom_scale(check_close) -> None:
    _run_and_check(1, 97, 2, 1, 32, torch.float16, True, check_close, scale=0.3)


def test_strided_inputs_from_a_packed_qkv_projection(check_close) -> None:
    """q, k, v as views of one (B, T, H + 2K, D) projection output: strided, last dim contiguous."""
    batch, seqlen, n_heads, n_kv, head_dim = 1, 40, 4, 2, 64
    qkv = torch.randn(batch, seqlen, n_heads + 2 * n_kv, head_dim, requires_grad=True)
    q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=2)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    out.sum().backward()
    qkv32 = qkv.detach().clone().requires_grad_()
    q32, k32, v32 = qkv32.split([n_heads, n_kv, n_kv], dim=2)
    ref = reference.attention(q32, k32, v32)
    ref.sum().backward()
    check_close("out", out, ref, ref, torch.float32)
    check_close("dqkv", qkv.grad, qkv32.grad, qkv32.grad, torch.float32)


def test_causal_output_ignores_future_keys() -> None:
    """Changing the last key/value must leave every earlier query's output unchanged."""
    q, k, v = (torch.randn(1, 37, 2, 64) for _ in range(3))
    out = flash_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1] += 5.0
    v2[:, -1] -= 5.0
    out2 = flash_attention(q, k2, v2)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(out2[:, -1], out[:, -1])


@pytest.mark.parametrize(
    ("make_args", "kwargs", "error", "match"),
    [
        (
            lambda: (torch.randn(1, 8, 3, 64), torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64)),
            {},
            ValueError,
            r"query heads 3 must be a multiple of kv heads 2",
        ),
        (
            lambda: (torch.randn(1, 8, 2, 48), torch.randn(1, 8, 2, 48), torch.randn(1, 8, 2, 48)),
            {},
            ValueError,
            r"head_dim=48 is not supported",
        ),
        (
            lambda: (torch.randn(1, 8, 2, 64), torch.randn(1, 9, 2, 64), torch.randn(1, 9, 2, 64)),
            {},
            ValueError,
            r"k.shape=\(1, 9, 2, 64\) must be \(1, 8, kv_heads, 64\)",
        ),
        (
            lambda: (torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64), torch.randn(1, 8, 1, 64)),
            {},
            ValueError,
            r"k.shape=\(1, 8, 2, 64\) and v.shape=\(1, 8, 1, 64\) must match",
        ),
        (
            lambda: (
                torch.randn(1, 8, 2, 64),
                torch.randn(1, 8, 2, 64).half(),
                torch.randn(1, 8, 2, 64),
            ),
            {},
            TypeError,
            r"dtypes must match",
        ),
        (
            lambda: (torch.randn(8, 2, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)),
            {},
            ValueError,
            r"q must have 4 dims",
        ),
        (
            lambda: (
                torch.randn(1, 8, 64, 2).transpose(-1, -2),
                torch.randn(1, 8, 2, 64),
                torch.randn(1, 8, 2, 64),
            ),
            {},
            ValueError,
            r"q must be contiguous in its last",
        ),
        (
            lambda: (torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64)),
            {"softmax_scale": -1.0},
            ValueError,
            r"softmax_scale=-1.0",
        ),
    ],
    ids=[
        "heads-not-multiple",
        "head-dim",
        "seq-mismatch",
        "kv-mismatch",
        "dtype-mismatch",
        "3d",
        "strided-head-dim",
        "bad-scale",
    ],
)
def test_bad_inputs_raise_clear_errors(make_args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        flash_attention(*make_args(), **kwargs)
