"""Activation checkpointing per transformer block: `full` recomputes the whole block in
backward; `selective` keeps the outputs of the matmuls, the attention op and the tensor-parallel
reduce-scatters, and recomputes only the cheap elementwise ops (norms, RoPE, SiLU): most of the
memory saving for a fraction of the cost.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import create_selective_checkpoint_contexts

# Ops whose outputs selective AC keeps. Every attention backend megalite can run must be here:
# a missing one is recomputed in backward, one extra attention forward per layer.
_SAVE_ATEN = (
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    # Sequence parallelism ends each attention and MLP with a reduce-scatter (torchtitan saves
    # it too): recomputing it would put a collective into every block's backward. The
    # all-gathers that start them are recomputed, as in Megatron-LM, to keep one full-sequence
    # activation fewer per block.
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
)
# Ops registered by modules imported only when their backend is chosen (megalite's Triton
# attention imports Triton; flash-attn may be absent): looked up by name when AC is applied.
_SAVE_BY_NAME = (
    "megalite::flash_attention_fwd",
    "flash_attn::_flash_attn_forward",
)


def _registered_op(qualname: str) -> torch._ops.OpOverload | None:
    namespace, name = qualname.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def save_list() -> list[torch._ops.OpOverload]:
    """The ops selective AC saves, among those registered in this process now (call it after
    the model is built: building imports the chosen attention backend)."""
    by_name = (_registered_op(name) for name in _SAVE_BY_NAME)
    return [*_SAVE_ATEN, *(op for op in by_name if op is not None)]


def apply_ac(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    context_fn = partial(create_selective_checkpoint_contexts, save_list())
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)
        model.layers[name] = wrapped
