"""The kernels inside torch.compile: custom-op registration, fake impls, autograd, full graphs.

Each op is a ``torch.library.custom_op`` (forward and backward ops) with a fake impl, called from
a ``torch.autograd.Function``. Under the interpreter the compiled graph calls the same ops, so
these tests exercise the path a GPU run takes, except the GPU kernels themselves.
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from megalite.kernels.cross_entropy import cross_entropy
from megalite.kernels.flash_attention import flash_attention
from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megalite.kernels.rms_norm import rms_norm
from torch._dynamo.backends.common import aot_autograd

B, T, C, V, H, K, D = 2, 24, 64, 130, 4, 2, 32


def _block(x, norm_w, wqkv, wo, head, target):
    """A tiny pre-norm attention block and both loss paths, using all four kernels."""
    h = rms_norm(x, norm_w)
    qkv = (h @ wqkv.t()).view(B, T, H + 2 * K, D)
    q, k, v = qkv.split([H, K, K], dim=2)
    attn = flash_attention(q, k, v, causal=True).reshape(B, T, H * D)
    out = (x + attn @ wo.t()).reshape(B * T, C)
    return fused_linear_cross_entropy(out, head, target) + cross_entropy(out @ head.t(), target)


def _inputs():
    params = [
        torch.randn(B, T, C),
        1 + 0.1 * torch.randn(C),
        torch.randn((H + 2 * K) * D, C) / 8,
        torch.randn(C, H * D) / 8,
        torch.randn(V, C) / 8,
    ]
    target = torch.randint(0, V, (B * T,))
    target[::7] = -100
    return params, target


def _loss_and_grads(fn, params, target):
    leaves = [p.clone().requires_grad_() for p in params]
    loss = fn(*leaves, target)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def test_full_graph_traces_custom_ops_forward_and_backward() -> None:
    """fullgraph=True fails on any graph break; the captured graphs must call our ops."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    params, target = _inputs()
    compiled = torch.compile(
        _block, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True
    )
    loss_c, grads_c = _loss_and_grads(compiled, params, target)
    loss_e, grads_e = _loss_and_grads(_block, params, target)
    torch.testing.assert_close(loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e)

    assert len(graphs) == 2, "expected one forward and one backward graph"
    targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
    fwd_ops = {
        "megalite.rms_norm_fwd.default",
        "megalite.flash_attention_fwd.default",
        "megalite.fused_linear_cross_entropy_fwd.default",
        "megalite.cross_entropy_fwd.default",
    }
    bwd_ops = {
        "megalite.rms_norm_bwd.default",
        "megalite.flash_attention_bwd.default",
        "megalite.cross_entropy_bwd.default",
    }
    assert fwd_ops <= targets[0], sorted(targets[0])
    assert bwd_ops <= targets[1], sorted(targets[1])


@pytest.mark.slow
def test_inductor_compiled_block_matches_eager() -> None:
    """The default backend (inductor) generates code that calls the custom ops (~25 s of C++
    compilation on two cores, hence slow)."""
    params, target = _inputs()
    torch._dynamo.reset()
    loss_c, grads_c = _loss_and_grads(torch.compile(_block, fullgraph=True), params, target)
    loss_e, grads_e = _loss_and_grads(_block, params, target)
    torch.testing.assert_close(loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e)


def _opcheck_cases():
    x = torch.randn(5, 40)
    w = torch.randn(40)
    logits = torch.randn(6, 150)
    target = torch.randint(0, 150, (6,))
    hidden = torch.randn(6, 16)
    head = torch.randn(150, 16)
    q = torch.randn(1, 20, 2, 32)
    k = torch.randn(1, 20, 1, 32)
    v = torch.randn(1, 20, 1, 32)
    o, lse = torch.ops.megalite.flash_attention_fwd(q, k, v, True, 0.2)
    rstd = torch.ops.megalite.rms_norm_fwd(x, w, 1e-6)[1]
    ce_lse = torch.ops.megalite.cross_entropy_fwd(logits, target, -100)[1]
    ops = torch.ops.megalite
    return {
        "rms_norm_fwd": (ops.rms_norm_fwd, (x, w, 1e-6)),
        "rms_norm_bwd": (ops.rms_norm_bwd, (torch.randn(5, 40), x, w, rstd)),
        "cross_entropy_fwd": (ops.cross_entropy_fwd, (logits, target, -100)),
        "cross_entropy_bwd": (ops.cross_entropy_bwd, (logits, target, ce_lse, torch.rand(6), -100)),
        "flce_fwd": (
            ops.fused_linear_cross_entropy_fwd,
            (hidden, head, target, -100, "mean", True),
        ),
        "flce_fwd_no_grad": (
            ops.fused_linear_cross_entropy_fwd,
            (hidden, head, target, -100, "sum", False),
        ),
        "flce_bwd": (
            ops.fused_linear_cross_entropy_bwd,
            (hidden, head, target, torch.rand(6), -100),
        ),
        "attention_fwd": (ops.flash_attention_fwd, (q, k, v, True, 0.2)),
        "attention_bwd": (
            ops.flash_attention_bwd,
            (torch.randn_like(o), q, k, v, o, lse, True, 0.2),
        ),
    }


OPCHECK_CASES = [
    "rms_norm_fwd",
    "rms_norm_bwd",
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "flce_fwd",
    "flce_fwd_no_grad",
    "flce_bwd",
    "attention_fwd",
    "attention_bwd",
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    """torch.library.opcheck: schema, fake impl vs real outputs, dispatch under AOTAutograd."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )
