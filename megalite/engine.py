"""The training engine: what turns a step's micro-batches into an update, and what a checkpoint
holds of the model and optimizer. Two implementations behind one small interface, so the
training loop has no per-engine branches:

- `NativeEngine` (here): the model parallelized by `parallelize` (one process, DDP, FSDP2 /
  HSDP, TP), megalite's AdamW, bf16 autocast (or FSDP2's mixed precision), gradient clipping,
  gradient reduction deferred to the last micro-batch, DCP checkpoints.
- `DeepSpeedEngine` (parallel/deepspeed.py): ZeRO stages 1-3 with DeepSpeed's own
  accumulation, clipping, bf16 and checkpoint files.
- `PipelineEngine` (parallel/pipeline.py): parallel.pp > 1, stages of the model on
  torch.distributed.pipelining schedules, each stage parallelized like the native model.

    engine = build_engine(cfg, dims, mesh, device, global_batch, init_from)
    loss_sum, grad_norm = engine.forward_backward(micro_batches, poison=None)
    engine.optimizer_step(apply=verdict.apply)
    engine.save(dir); engine.load(dir)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megalite import checkpoint
from megalite.config import Config
from megalite.model.transformer import Transformer
from megalite.optim import build_optimizer
from megalite.parallel.dims import ParallelDims
from megalite.parallel.float8 import install_scale_precompute
from megalite.parallel.parallelize import gradient_sync, parallelize

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), on the run's device


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (a DTensor loss or grad norm)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Engine(Protocol):
    # "dcp" or "deepspeed": the format of the model + optimizer files in a checkpoint.
    checkpoint_format: str
    model: nn.Module  # what to call (a wrapper around the Transformer, or the Transformer)
    optimizer: torch.optim.Optimizer  # its param_groups carry the learning rate

    def forward_backward(
        self, micro_batches: Iterable[Batch], poison: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs forward and backward over one optimizer step's micro-batches; returns (sum of
        the micro-batch losses, global gradient norm) as device tensors (no host sync)."""

    def optimizer_step(self, apply: bool) -> None:
        """Applies the update (unless the loss guard said no) and clears the gradients."""

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def save(self, directory: Path) -> None:
        """Writes model + optimizer state into `directory` (a collective)."""

    def load(self, directory: Path) -> None: ...


class NativeEngine:
    checkpoint_format = "dcp"

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, dims: ParallelDims
    ) -> None:
        self.model, self.optimizer, self.dims = model, optimizer, dims
        self.accum = cfg.train.grad_accum_steps
        self.defer_grad_sync = cfg.parallel.defer_grad_sync
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        # FSDP2 casts parameters to bf16 itself (MixedPrecisionPolicy); DDP, TP and one device
        # use autocast. Either way the master weights and optimizer state stay fp32.
        device_type = next(iter(model.parameters())).device.type
        use_autocast = cfg.train.precision == "bf16" and not dims.uses_fsdp
        self.autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16) if use_autocast else nullcontext()
        )
        # Under tensor parallelism the logits are vocab-sharded: the loss and its backward run
        # inside loss_parallel.
        self.loss_context = loss_parallel if dims.tp > 1 else nullcontext

    def forward_backward(
        self, micro_batches: Iterable[Batch], poison: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = None
        for i, (x, y) in enumerate(micro_batches):
            # Gradients are reduced once per optimizer step, on the last micro-batch.
            last = i == self.accum - 1
            with gradient_sync(self.model, last, self.dims, self.defer_grad_sync):
                with self.loss_context():
                    with self.autocast:
                        loss = self.model(x, y)
                        if poison is not None:  # test machinery (resilience.Faults)
                            loss = loss * poison
                    (loss / self.accum).backward()
            loss = full(loss.detach()).float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        # Global on every rank: DDP's gradients are reduced; FSDP / TP norms are reduced over
        # the shards.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        return loss_sum, full(norm)

    def optimizer_step(self, apply: bool) -> None:
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.loss_context(), self.autocast:
            return full(self.model(x, y)).float()

    def save(self, directory: Path) -> None:
        checkpoint.save_dcp(self.model, self.optimizer, directory)

    def load(self, directory: Path) -> None:
        checkpoint.load_dcp(self.model, self.optimizer, directory)


def build_engine(
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    global_batch: int,
    init_from: Path | None = None,
    model: Transformer | None = None,
) -> Engine:
    """The engine for `parallel.strategy`, its model materialized on `device` with the initial
    weights every layout shares, or those of the checkpoint `init_from`. `model`: the
    meta-device Transformer preflight built, if any (built here otherwise)."""
    if dims.uses_deepspeed:
        from megalite.parallel import deepspeed as ds

        return ds.build(cfg, dims, global_batch, device, init_from)
    if dims.pp > 1:
        from megalite.parallel.pipeline import build_pipeline_engine

        return build_pipeline_engine(cfg, dims, mesh, device, init_from, model)
    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg.model, loss=cfg.train.loss)
    module = parallelize(model, cfg, dims, mesh, device)
    if init_from is not None:
        checkpoint.load_model_weights(init_from, module, cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    install_scale_precompute(model, optimizer, cfg, dims.uses_fsdp)
    return NativeEngine(module, optimizer, cfg, dims)
