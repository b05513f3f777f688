"""The one place parallelism is applied to a model built by megalite.model, from outside it.

Order (torchtitan's): float8 conversion (parallel/float8.py) -> tensor/sequence parallel ->
context parallel (parallel/context.py: hooks and the attention function) -> activation
checkpointing -> torch.compile -> FSDP2 (over dp_shard x cp), all on the meta device; then the
sharded model is materialized and initialized (each rank writes only its shards of the same full
weights a single process would have); DDP wraps last.
DeepSpeed strategies build through parallel/deepspeed.py: zero1/2 materialize here and their
engine wraps the model; zero3 never comes here (its model is partitioned as it is constructed).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from megalite.config import Config
from megalite.model.transformer import Transformer
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.context import apply_cp, fsdp_mesh
from megalite.parallel.dims import ParallelDims
from megalite.parallel.float8 import convert as convert_float8
from megalite.parallel.fsdp import apply_fsdp
from megalite.parallel.tp import apply_tp


def compile_blocks(model: nn.Module) -> None:
    """Compiles each transformer block on its own: the blocks share one compiled graph, compile
    time does not grow with depth, and FSDP's hooks stay outside the graphs."""
    for block in model.layers.values():
        block.compile()


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP;
    with context parallelism dp_shard x cp takes dp_shard's place."""
    if dims.cp > 1:
        return fsdp_mesh(mesh, dims.dp_replicate)
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Writes this rank's part of `full` into a (possibly sharded) parameter. Every rank holds
    the same `full` (same seed), so no communication is needed (src_data_rank=None)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def parallelize(
    model: Transformer,
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
) -> nn.Module:
    """Takes the model on the meta device; returns the materialized module to train."""
    # First, so TP, AC, compile and FSDP2 all wrap the float8 modules (a no-op for float8=none).
    convert_float8(model, cfg, device_type=device.type, fsdp=dims.uses_fsdp)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        # TP gave the embedding and the output layer new (DTensor) parameters; both are split
        # over the vocabulary (Shard(0)), so a tied pair can share one again. FSDP then tracks
        # the shared parameter once.
        model.tie_weights()
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], cfg.parallel.cp_mode)
    apply_ac(model, cfg.parallel.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model)
    if dims.uses_fsdp:
        apply_fsdp(
            model,
            dp_mesh(mesh, dims),
            param_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
            reshard_after_forward=cfg.parallel.reshard_after_forward,
        )
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed=cfg.train.seed, copy_fn=_copy_shard)
    if dims.uses_ddp and torch.distributed.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool, dims: ParallelDims, defer: bool = True):
    """Wraps the forward and backward of one micro-batch. With `enabled` False (every micro-batch
    but the last of an optimizer step) the gradient reduction is deferred, so a step with
    gradient accumulation communicates once, not once per micro-batch:

    - DDP: `no_sync()`; gradients accumulate locally, all-reduced on the last micro-batch.
    - FSDP2 (fully_shard): `set_requires_gradient_sync(False)` skips the reduce-scatter; each
      rank then holds unsharded fp32 gradients until the last micro-batch (parameters x 4 bytes
      / tp). Where that does not fit, `parallel.defer_grad_sync=false` reduce-scatters every
      micro-batch instead.
    - HSDP: `set_requires_all_reduce(False)` keeps the (intra-group) reduce-scatter, so
      gradients stay sharded, and defers only the all-reduce across replicas.
    - one process, TP alone, DeepSpeed (which accumulates itself): nothing to defer.
    """
    if enabled or not defer:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        hsdp = dims.dp_replicate > 1
        setter = model.set_requires_all_reduce if hsdp else model.set_requires_gradient_sync
        setter(False)
        try:
            yield
        finally:
            setter(True)
    else:
        yield
