"""FSDP2 (`fully_shard`): the units a Llama-style model is sharded into (torchtitan's layout).

Parameters are held sharded in fp32 (the master weights); each unit all-gathers them in the
compute dtype (bf16) just before use and reduce-scatters gradients in fp32. A unit's parameters
are whole only from its first use in a pass to the end of its last, so the units follow use:

    tok_embeddings     reshard_after_forward=cfg  used first in forward, last in backward
    layers.0 .. N-2    reshard_after_forward=cfg
    layers.N-1         False: backward needs it again at once
    [norm, output]     False: backward needs it again at once
    root               reshard_after_forward=cfg  holds what is left (nothing, when untied)

Before, the root held the embedding and the output head, both whole through the entire forward
and backward (2 x vocab x dim: 2.0 GiB in bf16 for an 8B model, 3.9 GiB for 70B).

Tied embeddings (`model.tie_embeddings=true`): one parameter can belong to one unit only, and
the tied matrix is used at both ends of every pass (embedding first in forward, the head last;
the head first in backward, the embedding last). Any unit holding it is whole from the first
use to the last, so a unit of its own would save nothing over the root: the tied pair and the
final norm stay in the root. That costs one vocab x dim matrix, half of the untied case before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

# With train.loss=fused_linear the model hands `output.weight` to the fused kernel and never calls
# `output`, so a [norm, output] unit sees only `norm` run. torch completes such a partly-run unit
# at the root's post-forward since pytorch#180428 (2.12); earlier releases leave it half-done
# and the next forward fails ("got mixed torch.Tensor and DTensor"). There the head stays in
# the root, which runs forward whatever the model does inside it.
PARTIAL_GROUP_FORWARD = hasattr(FSDPState, "_force_complete_incomplete_states")


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    shard = functools.partial(fully_shard, mesh=dp_mesh, mp_policy=mp)
    tied = model.output.weight is model.tok_embeddings.weight
    if not tied:
        shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    head_is_called = getattr(model, "_fused_loss", None) is None
    if not tied and (head_is_called or PARTIAL_GROUP_FORWARD):
        shard([model.norm, model.output], reshard_after_forward=False)
    shard(model, reshard_after_forward=reshard_after_forward)
