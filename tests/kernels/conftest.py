"""Kernel tests run the Triton kernels on CPU in the interpreter.

TRITON_INTERPRET must be set before anything imports triton (the root conftest sets it too); the
kernel modules are imported inside the test modules, after this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small relative slack on top of 2x PyTorch's own error (flash-attention's tolerance rule).
BASE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def check_close(
    name: str,
    out: torch.Tensor,
    ref32: torch.Tensor,
    pt: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """Assert the kernel's error against the fp32 reference is at most twice PyTorch's own error
    in ``dtype`` (``pt``: the plain op computed in that dtype), plus a small atol, plus one bf16
    ulp because the interpreter truncates bf16 stores instead of rounding them."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    out, ref32, pt = out.double(), ref32.double(), pt.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel output"
    scale = ref32.abs().max().item()
    err = (out - ref32).abs().max().item()
    pt_err = (pt - ref32).abs().max().item()
    atol = BASE_ATOL[dtype] * (1.0 + scale)
    ulp = torch.finfo(torch.bfloat16).eps * scale if dtype == torch.bfloat16 else 0.0
    tol = 2 * pt_err + atol + ulp
    assert err <= tol, (
        f"{name} ({dtype}): max |kernel - fp32 reference| = {err:.3g} exceeds "
        f"2 x PyTorch {dtype} error {pt_err:.3g} + atol {atol:.3g} + bf16 ulp {ulp:.3g}"
    )


@pytest.fixture(name="check_close")
def check_close_fixture():
    """``check_close`` as a fixture, so test modules need no import path to this file."""
    return check_close


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
