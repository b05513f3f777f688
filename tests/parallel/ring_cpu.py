"""Runs torch's ring attention on a CPU, so that `parallel.cp_mode=ring` (megalite's
RingAttention, torch's k/v rotation over the process group, its causal load balance, its
log-sum-exp merge and its backward ring) is exercised on gloo.

On a GPU, torch's context-parallel dispatcher (`_enable_context_parallel_dispatcher`, which
RingAttention turns on) intercepts `aten::_scaled_dot_product_{flash,efficient,cudnn}_attention`
and their backwards on sequence-sharded DTensors and runs `_templated_ring_attention[_backward]`
with that CUDA kernel per chunk. On a CPU, `F.scaled_dot_product_attention` calls
`aten::_scaled_dot_product_flash_attention_for_cpu` instead, which the dispatcher does not know.
`install()` adds that op (and its backward) to the dispatcher's handler table, routed to the same
two torch ring functions with the CPU flash kernel per chunk.

So only the per-chunk kernel and the table entry differ from a GPU run; the ring itself is
torch's code on a real process group. For tests only (tests/parallel/ring_driver.py); megalite
itself still refuses ring on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

aten = torch.ops.aten
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
SEQ_DIM = 2  # SDPA's (B, H, S, D)
# Ring forwards and backwards run in this process (per attention call), so a test can tell that
# the ring ran at all.
CALLS = {"forward": 0, "backward": 0}


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in, DTensors made local."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        bound[arg.name] = value.to_local() if isinstance(value, DTensor) else value
    return bound


def _handler(op_call: torch._ops.OpOverload, args: tuple, kwargs: dict) -> object:
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _templated_ring_attention,
        _templated_ring_attention_backward,
    )

    spec = next(a for a in args if isinstance(a, DTensor))
    mesh = spec.device_mesh
    if any(not isinstance(p, Shard) or p.dim != SEQ_DIM for p in spec.placements):
        raise AssertionError(f"ring attention wants Shard({SEQ_DIM}), got {spec.placements}")
    a = _bind(op_call, args, kwargs)
    if a.pop("attn_mask") is not None:
        raise NotImplementedError("ring attention takes no attention mask")
    group = mesh.get_group()
    CALLS["forward" if op_call is FORWARD else "backward"] += 1
    if op_call is FORWARD:
        results = _templated_ring_attention(
            group,
            SEQ_DIM,
            FORWARD,
            a.pop("query"),
            a.pop("key"),
            a.pop("value"),
            is_causal=a.pop("is_causal"),
            **a,
        )
    else:
        grad_out = a.pop("grad_out")
        results = _templated_ring_attention_backward(
            group,
            SEQ_DIM,
            BACKWARD,
            grad_out,
            "grad_out",
            a.pop("query"),
            a.pop("key"),
            a.pop("value"),
            a.pop("out"),
            a.pop("logsumexp"),
            a.pop("is_causal"),
            **a,
        )
    # Every output (out, log-sum-exp; or dq, dk, dv) is sharded over the sequence as q is.
    return tuple(DTensor.from_local(t, mesh, [Shard(SEQ_DIM)], run_check=False) for t in results)


def install() -> None:
    """Adds the CPU ops to torch's table of context-parallel handlers, which
    `_enable_context_parallel_dispatcher` (RingAttention) installs into DTensor's dispatcher."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    _attention.custom_ops.update({FORWARD: _handler, BACKWARD: _handler})
