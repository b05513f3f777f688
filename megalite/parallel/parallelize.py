"""The one place parallelism is applied to a model built by megalite.model, from outside it.

Order (torchtitan's): tensor/sequence parallel -> activation checkpointing -> torch.compile ->
data parallel (FSDP2 or DDP). This core supports `single` and `ddp`; the other layouts plug in
here without touching the model.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from megalite.config import Config
from megalite.parallel.distributed import DistInfo


def compile_blocks(model: nn.Module) -> None:
    """Compiles each transformer block on its own: the blocks share one compiled graph, compile
    time does not grow with depth, and wrappers applied later stay outside the graphs."""
    for block in model.layers.values():
        block.compile()


def parallelize(model: nn.Module, cfg: Config, dist_info: DistInfo) -> nn.Module:
    """Returns the module to train: `model` itself, or a wrapper around it."""
    if cfg.train.compile:
        compile_blocks(model)
    if cfg.parallel.strategy == "ddp" and dist_info.world_size > 1:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside any wrapper (DDP keeps it as `.module`)."""
    return module.module if isinstance(module, DDP) else module
