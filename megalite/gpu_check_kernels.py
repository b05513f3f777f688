"""`megalite-gpu-check`, part (a): every Triton kernel against its pure-PyTorch reference.

For each kernel, each dtype (fp32, bf16; the fused linear cross-entropy also under bf16 autocast
with fp32 inputs, the training loop's case) and each tensor (the output and every gradient), one
row with the kernel's max abs error against the fp32 reference (`megalite.kernels.reference`),
that error relative to max |reference|, and the pass / fail verdict.

Tolerance (flash-attention's rule, the one tests/kernels uses): the kernel's error may be at most
twice PyTorch's own error in that dtype (the same math written in plain PyTorch ops and run in the
low-precision dtype, against the same fp32 reference), plus `ATOL[dtype] x (1 + max |reference|)`,
plus one bf16 ulp of max |reference| under the Triton interpreter (it truncates bf16 stores
instead of rounding). In fp32 PyTorch's error is zero by construction, so the bound is the atol:
the kernel must agree with fp32 PyTorch up to summation order (no TF32).

On a GPU the shapes are a Llama 3 1B layer's (hidden 2048, vocab 128256, 32 heads of 64, GQA 4)
with odd row and sequence counts so every kernel's ragged-edge masking runs; `--smoke` uses tiny
shapes of the same kinds under TRITON_INTERPRET=1 (the caller sets it before triton is imported).

Shape legend: N rows, C hidden, V vocab, B batch, T sequence, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from megalite.kernels import reference

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


@dataclass(frozen=True)
class Shapes:
    rms_NC: tuple[int, int]
    ce_NV: tuple[int, int]
    flce_NCV: tuple[int, int, int]
    # (B, T, H, K, D) cases; several head dims, since each has its own tile configs.
    attention: tuple[tuple[int, int, int, int, int], ...]


GPU_SHAPES = Shapes(
    rms_NC=(4099, 2048),
    ce_NV=(2053, 128256),
    flce_NCV=(4099, 2048, 128256),
    attention=((2, 2047, 32, 8, 64), (1, 1021, 16, 4, 128)),
)
SMOKE_SHAPES = Shapes(
    rms_NC=(19, 48),
    ce_NV=(13, 211),
    flce_NCV=(21, 32, 97),
    attention=((1, 23, 4, 2, 32),),
)


@dataclass
class Compared:
    """One tensor of one case: the kernel's value, the fp32 reference, PyTorch in the dtype."""

    name: str
    kernel: torch.Tensor
    ref32: torch.Tensor
    pt: torch.Tensor


def tolerance(pt_err: float, scale: float, dtype: torch.dtype, interpreted: bool) -> float:
    ulp = torch.finfo(torch.bfloat16).eps * scale if dtype == torch.bfloat16 and interpreted else 0
    return 2 * pt_err + ATOL[dtype] * (1.0 + scale) + ulp


def _fwd_bwd(
    fn: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    grad_out: torch.Tensor,
    autocast: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """[output, d input_0, d input_1, ...] of fn on fresh leaves of `inputs`."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ctx = torch.autocast(leaves[0].device.type, dtype=autocast) if autocast else nullcontext()
    with ctx:
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def _compare(names: list[str], kernel: list, ref32: list, pt: list) -> list[Compared]:
    return [Compared(n, k, r, p) for n, k, r, p in zip(names, kernel, ref32, pt, strict=True)]


# ------------------------------------------------------------------------------- the cases
def rms_norm_case(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> list[Compared]:
    from megalite.kernels.rms_norm import rms_norm

    n, c = shape
    eps = 1e-6
    x = (torch.randn(n, c, device=device) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(c, device=device)).to(dtype)
    dy = torch.randn(n, c, device=device).to(dtype)

    def plain(x, w):  # RMSNorm in plain PyTorch, every op in the input dtype
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    kernel = _fwd_bwd(lambda x, w: rms_norm(x, w, eps), [x, w], dy)
    ref = _fwd_bwd(lambda x, w: reference.rms_norm(x, w, eps), [x.float(), w.float()], dy.float())
    return _compare(["y", "dx", "dweight"], kernel, ref, _fwd_bwd(plain, [x, w], dy))


def _targets(n: int, vocab: int, device: torch.device) -> torch.Tensor:
    target = torch.randint(0, vocab, (n,), device=device)
    target[::4] = -100  # every fourth token ignored, as padding would be
    return target


def cross_entropy_case(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> list[Compared]:
    from megalite.kernels.cross_entropy import cross_entropy

    n, v = shape
    logits = (4 * torch.randn(n, v, device=device)).to(dtype)
    target = _targets(n, v, device)
    grad = torch.tensor(1.7, device=device)
    kernel = _fwd_bwd(lambda x: cross_entropy(x, target), [logits], grad)
    ref = _fwd_bwd(lambda x: reference.cross_entropy(x, target), [logits.float()], grad)
    pt = _fwd_bwd(lambda x: F.cross_entropy(x, target), [logits], grad)
    return _compare(["loss", "dlogits"], kernel, ref, pt)


def fused_linear_ce_case(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    autocast: bool = False,
) -> list[Compared]:
    """`autocast`: fp32 leaves under bf16 autocast (the trainer's case: fp32 master weights and
    residual stream, bf16 GEMMs); `dtype` is then the autocast dtype."""
    from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    n, c, v = shape
    leaf_dtype = torch.float32 if autocast else dtype
    h = torch.randn(n, c, device=device).to(leaf_dtype)
    w = (torch.randn(v, c, device=device) / c**0.25).to(leaf_dtype)
    target = _targets(n, v, device)
    grad = torch.tensor(0.6, device=device)
    amp = dtype if autocast else None
    kernel = _fwd_bwd(lambda h, w: fused_linear_cross_entropy(h, w, target), [h, w], grad, amp)
    ref = _fwd_bwd(
        lambda h, w: reference.fused_linear_cross_entropy(h, w, target),
        [h.float(), w.float()],
        grad,
    )
    if autocast:  # what the unfused model computes under autocast
        pt = _fwd_bwd(lambda h, w: F.cross_entropy(F.linear(h, w), target), [h, w], grad, amp)
    else:
        pt = _fwd_bwd(lambda h, w: F.cross_entropy(h @ w.t(), target), [h, w], grad)
    return _compare(["loss", "dhidden", "dweight"], kernel, ref, pt)


def attention_case(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device
) -> list[Compared]:
    from megalite.kernels.flash_attention import flash_attention

    b, t, h, k, d = shape
    q = torch.randn(b, t, h, d, device=device).to(dtype)
    kk = torch.randn(b, t, k, d, device=device).to(dtype)
    v = torch.randn(b, t, k, d, device=device).to(dtype)
    do = torch.randn(b, t, h, d, device=device).to(dtype)

    def plain(q, k, v):  # attention in plain PyTorch, every op in the input dtype
        rep = q.shape[2] // k.shape[2]
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
        k_, v_ = k_.repeat_interleave(rep, dim=1), v_.repeat_interleave(rep, dim=1)
        scores = (q_ @ k_.transpose(-2, -1)) * d**-0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v_).transpose(1, 2)

    inputs = [q, kk, v]
    kernel = _fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=True), inputs, do)
    ref = _fwd_bwd(
        lambda q, k, v: reference.attention(q, k, v, causal=True),
        [x.float() for x in inputs],
        do.float(),
    )
    return _compare(["out", "dq", "dk", "dv"], kernel, ref, _fwd_bwd(plain, inputs, do))


# -------------------------------------------------------------------------------- running
def _label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _cases(shapes: Shapes) -> list[tuple[str, str, torch.dtype, Callable]]:
    """(kernel, shape label, dtype, run(device) -> list[Compared]) for every check."""
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        ce, flce = shapes.ce_NV, shapes.flce_NCV
        cases += [
            ("rms_norm", _label(shapes.rms_NC), dt, partial(rms_norm_case, shapes.rms_NC, dt)),
            ("cross_entropy", _label(ce), dt, partial(cross_entropy_case, ce, dt)),
            (
                "fused_linear_cross_entropy",
                _label(flce),
                dt,
                partial(fused_linear_ce_case, flce, dt),
            ),
        ]
        for s in shapes.attention:
            cases.append(("flash_attention", _label(s), dt, partial(attention_case, s, dt)))
    autocast = partial(fused_linear_ce_case, shapes.flce_NCV, torch.bfloat16, autocast=True)
    label = _label(shapes.flce_NCV) + " autocast"
    cases.append(("fused_linear_cross_entropy", label, torch.bfloat16, autocast))
    return cases


def kernel_row(kernel: str, shape: str, dtype: torch.dtype, c: Compared, interpreted: bool) -> dict:
    out, ref, pt = c.kernel.double(), c.ref32.double(), c.pt.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    finite = bool(torch.isfinite(out).all())
    err = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
    pt_err = (pt - ref).abs().max().item()
    tol = tolerance(pt_err, scale, dtype, interpreted)
    ok = finite and c.kernel.shape == c.ref32.shape and err <= tol
    if ok:
        reason = ""
    elif not finite:
        reason = "non-finite values in the kernel's output"
    elif c.kernel.shape != c.ref32.shape:
        reason = f"shape {tuple(c.kernel.shape)} != reference {tuple(c.ref32.shape)}"
    else:
        reason = f"error {err:.3g} exceeds the tolerance {tol:.3g}"
    return {
        "section": "kernels",
        "check": f"{kernel} {shape} {_dtype_name(dtype)} {c.name}",
        "kernel": kernel,
        "shape": shape,
        "dtype": _dtype_name(dtype),
        "tensor": c.name,
        "max_abs_err": err,
        "max_rel_err": err / scale if scale else err,
        "torch_lowp_err": pt_err,
        "tolerance": tol,
        "status": "pass" if ok else "fail",
        "reason": reason,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def check_kernels(device: torch.device, smoke: bool) -> list[dict]:
    """One row per kernel x dtype x tensor (output and every gradient)."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    rows = []
    # The references must be true fp32: TF32 GEMMs would put 1e-3 errors into the "truth".
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for kernel, shape, dtype, run in _cases(shapes):
            torch.manual_seed(0)
            try:
                compared = run(device)
            except Exception as e:  # a kernel that crashes is a failed row, not a crashed check
                first = str(e).splitlines()[0] if str(e) else ""
                rows.append(
                    {
                        "section": "kernels",
                        "check": f"{kernel} {shape} {_dtype_name(dtype)}",
                        "kernel": kernel,
                        "shape": shape,
                        "dtype": _dtype_name(dtype),
                        "tensor": "*",
                        "status": "fail",
                        "reason": f"{type(e).__name__}: {first}",
                    }
                )
                continue
            rows += [kernel_row(kernel, shape, dtype, c, interpreted) for c in compared]
            del compared
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows
