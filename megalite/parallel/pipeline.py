"""Pipeline parallelism on torch.distributed.pipelining, composed with FSDP2 / HSDP and tensor
parallelism on the (dp_replicate, dp_shard, pp, cp, tp) mesh.

How a run is built (`build_pipeline_engine`), from outside the single-device model:

1. The layers are split into stages balanced by cost (parallel/pp_split.py; printed at start).
2. Each stage this rank runs is the full Transformer built on the meta device with every other
   stage's modules deleted (`StageModel`): the embedding stays on the first stage, the final
   norm and the output head on the last, and each parameter keeps the name it has in the full
   model. So a DCP checkpoint written under any pipeline layout is an ordinary megalite
   checkpoint: it loads at pp=1, under another pp / dp / tp layout, and in megalite-convert and
   megalite-generate unchanged.
3. Each stage is parallelized like the whole model (TP -> AC -> compile -> FSDP2 over the
   data-parallel mesh), materialized and initialized with the weights a single process has.
4. A `PipelineStage` per local stage and one torch schedule (parallel.pp_schedule) over them.

One optimizer step (`PipelineEngine.forward_backward`): each train micro-batch is one call of
`schedule.step`, split into parallel.pp_microbatches pipeline micro-batches; the loss function
on the last stage scales each chunk's mean cross-entropy by 1 / (chunks x grad_accum_steps), so
the accumulated gradient is the one a single process computes over the same global batch
(the schedule's own 1/chunks scaling is off: it would divide the gradients accumulated by
earlier micro-batches again). FSDP2 gradients are reduce-scattered at the end of each
`schedule.step`, i.e. once per train micro-batch. The gradient norm is summed over the stages
(an all-reduce over the pp group) before clipping.

The loss exists only on the ranks of the last stage. The trainer averages the step's loss over
all ranks; so the last stage's ranks report it pp times and the others report 0: the average is
the data-parallel mean, with no extra collective.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megalite import checkpoint
from megalite.config import Config, ModelConfig
from megalite.model.transformer import Transformer, canonical_name
from megalite.optim import build_optimizer, param_groups
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.dims import ParallelDims
from megalite.parallel.distributed import DistInfo
from megalite.parallel.parallelize import _copy_shard, compile_blocks, dp_mesh
from megalite.parallel.pp_schedules import PP_SCHEDULES, microbatches
from megalite.parallel.pp_split import Stage, describe_split, split_stages
from megalite.parallel.tp import apply_tp

Batch = tuple[torch.Tensor, torch.Tensor]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class StageModel(Transformer):
    """The modules of one pipeline stage, under the names they have in the full model.

    Built like the full model (on the meta device: nothing is allocated), then the other
    stages' blocks are deleted, and the embedding (first stage only) and the final norm and
    output head (last stage only) set to None. `forward` takes tokens (first stage) or the
    hidden state, and returns the hidden state or, on the last stage, the logits; the loss is
    the schedule's loss function."""

    def __init__(self, cfg: ModelConfig, loss: str, stage: Stage) -> None:
        super().__init__(cfg, loss=loss)
        self.stage = stage
        keep = {str(i) for i in stage.layers}
        for name in [n for n in self.layers if n not in keep]:
            del self.layers[name]
        if not stage.first:
            self.tok_embeddings = None
        if not stage.last:
            self.norm = None
            self.output = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = x if self.tok_embeddings is None else self.tok_embeddings(x)
        for layer in self.layers.values():
            h = layer(h, self.rope)
        if self.output is None:
            return h
        return self.output(self.norm(h))

    def tie_weights(self) -> None:
        # The config refuses tied embeddings under pipeline parallelism (the two ends of the
        # model live on different ranks).
        pass


class LocalStages(nn.Module):
    """The stages this rank runs, as one module with the full model's parameter names (the
    same submodules as the stage models: nothing is copied). It is what the optimizer, the
    checkpoint and the train and eval switches see."""

    def __init__(self, stages: list[StageModel]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for stage in stages:
            if stage.tok_embeddings is not None:
                self.tok_embeddings = stage.tok_embeddings
            for name, block in stage.layers.items():
                self.layers[name] = block
            if stage.output is not None:
                self.norm, self.output = stage.norm, stage.output


def shard_stage(
    model: StageModel, mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard: bool
) -> None:
    """FSDP2 units of one stage, as parallel/fsdp.py lays out the whole model: the embedding,
    each block, [norm, output] (used last in forward, first in backward: never resharded in
    between), and the stage root. The root must be an FSDPModule: PipelineStage defers the
    gradient reduce-scatter over the micro-batches through it."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    shard = partial(fully_shard, mesh=mesh, mp_policy=mp)
    if model.tok_embeddings is not None:
        shard(model.tok_embeddings, reshard_after_forward=reshard)
    for block in model.layers.values():
        shard(block, reshard_after_forward=reshard)
    if model.output is not None:
        shard([model.norm, model.output], reshard_after_forward=False)
    shard(model, reshard_after_forward=reshard)


def uses_fsdp(dims: ParallelDims) -> bool:
    """Under pipeline parallelism every data-parallel layout shards with FSDP2: fsdp, hsdp and
    fsdp_tp as usual, and ddp as HSDP with shard groups of one rank (an all-reduce of the
    gradients, like DDP; DDP itself cannot defer its reduction across a schedule's chunks)."""
    return dims.dp > 1


def parallelize_stage(
    model: StageModel, cfg: Config, dims: ParallelDims, mesh: DeviceMesh, device: torch.device
) -> StageModel:
    """parallelize.parallelize for one stage: TP -> AC -> compile -> FSDP2, then materialize
    and initialize (each parameter from its full-model name: the single-process weights)."""
    if dims.tp > 1:
        with warnings.catch_warnings():
            # The plan names the embedding, the norm and the head; a stage lacks some of them.
            warnings.filterwarnings("ignore", message="Parallelize plan key")
            apply_tp(model, mesh["tp"])
    apply_ac(model, cfg.parallel.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model)
    if uses_fsdp(dims):
        bf16 = cfg.train.precision == "bf16"
        shard_stage(
            model,
            dp_mesh(mesh, dims),
            torch.bfloat16 if bf16 else None,
            cfg.parallel.reshard_after_forward,
        )
    model.to_empty(device=device)
    model.init_weights(seed=cfg.train.seed, copy_fn=_copy_shard)
    return model


# The actions of a multi-stage schedule that a forward-only pass keeps.
_FORWARD_ACTIONS = {"F", "SEND_F", "RECV_F", "UNSHARD", "RESHARD"}


@contextmanager
def forward_only(schedule: torch_schedules._PipelineSchedule) -> Iterator[None]:
    """Runs a multi-stage schedule's `eval` on its forward actions only. torch 2.14's eval of a
    zero-bubble schedule still runs its input-backward actions and fails ("can't
    steal_bwd_input if this stage doesn't have backward"); dropping the backward actions keeps
    the forwards in the schedule's order, which cannot deadlock: it only removes waits."""
    order = getattr(schedule, "pipeline_order_with_comms", None)
    if not order:
        yield
        return
    kept = {
        rank: [a for a in actions if a is not None and a.computation_type.value in _FORWARD_ACTIONS]
        for rank, actions in order.items()
    }
    schedule.pipeline_order_with_comms = kept
    try:
        yield
    finally:
        schedule.pipeline_order_with_comms = order


def group_names(model: Transformer, cfg: Config) -> list[list[str]]:
    """The parameter names of each optimizer group of the full model, as a single process's
    optimizer state dict lists them."""
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, cfg.optim)]


class PipelineEngine:
    """The Engine (megalite/engine.py) of a pipeline-parallel run."""

    checkpoint_format = "dcp"

    def __init__(
        self,
        stages: list[StageModel],
        model: LocalStages,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        dims: ParallelDims,
        pp_group: dist.ProcessGroup,
        full_groups: list[list[str]],
    ) -> None:
        self.stages, self.model, self.optimizer = stages, model, optimizer
        self.schedule: torch_schedules._PipelineSchedule | None = None  # set by the builder
        self.dims, self.pp_group, self.full_groups = dims, pp_group, full_groups
        self.accum = cfg.train.grad_accum_steps
        self.chunks = microbatches(cfg)
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        self.has_first = any(s.stage.first for s in stages)
        self.last = next((s for s in stages if s.stage.last), None)
        device = next(iter(self.model.parameters())).device
        self.device = device
        # The collectives' helper (the device rule), for the pipeline group's gradient norm.
        self.dist = DistInfo(dist.get_rank(), dist.get_world_size(), device.index or 0, device)
        use_autocast = cfg.train.precision == "bf16" and not uses_fsdp(dims)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
        )
        self.loss_context = loss_parallel if dims.tp > 1 else nullcontext
        # Per optimizer step: the chunk losses of the last stage (undoing the accumulation
        # scale, which is a power of two in the usual configs: exact), and the test machinery's
        # loss factor (resilience.Faults).
        self._chunk_losses: list[torch.Tensor] = []
        self._poison: float | None = None
        self._scale = 1.0 / (self.chunks * self.accum)

    # ------------------------------------------------------------------------------ loss
    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One pipeline micro-batch's loss on the last stage, scaled for accumulation."""
        loss = self.last._cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self._poison is not None:  # test machinery (resilience.Faults)
            loss = loss * self._poison
        return loss * self._scale

    def _run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> None:
        args = (x,) if self.has_first else ()
        target = y if self.last is not None else None
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.autocast:
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                with forward_only(self.schedule):
                    self.schedule.eval(*args, target=target, losses=losses)
        # The schedule's own list: the loss function also runs when the schedule infers the
        # stages' shapes (the first step, and after each switch between train and eval).
        self._chunk_losses += [full(loss.detach()).float() / self._scale for loss in losses]

    def _reported(self, per_batch: int) -> torch.Tensor:
        """Sum of the micro-batch losses (each the mean over its chunks), times pp on the last
        stage's ranks and 0 elsewhere (see the module docstring)."""
        if self.last is None:
            return torch.zeros((), device=self.device)
        total = torch.stack(self._chunk_losses).sum() / per_batch
        return total * self.dims.pp

    # ------------------------------------------------------------------------- interface
    def forward_backward(
        self, micro_batches: Iterable[Batch], poison: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._chunk_losses.clear()
        self._poison = poison
        for x, y in micro_batches:
            self._run(x, y, train=True)
        self._poison = None
        return self._reported(self.chunks), self._clip()

    def _clip(self) -> torch.Tensor:
        """The global gradient norm (over the data-parallel and tensor-parallel shards, then
        over the stages), and the gradients clipped to parallel.grad_clip with it."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        local = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        squared = full(local).float() ** 2
        norm = self.dist.all_reduce(squared, "sum", group=self.pp_group).sqrt()
        if math.isfinite(self.max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return norm

    def optimizer_step(self, apply: bool) -> None:
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._chunk_losses.clear()
        self._run(x, y, train=False)
        return self._reported(self.chunks)

    def dcp_state(self) -> dict:
        """What the checkpoint holds: the state a single process would save, with full-model
        names, and each optimizer group listing every parameter of the model (this rank's
        optimizer knows only its stages' ones; every rank writes the same lists)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        for group, names in zip(optim_sd["param_groups"], self.full_groups, strict=True):
            group["params"] = list(names)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory: Path) -> None:
        with checkpoint.quiet_dcp():
            dcp.save(self.dcp_state(), checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        local = [list(g["params"]) for g in optim_sd["param_groups"]]
        state = {"model": model_sd, "optim": optim_sd}
        with checkpoint.quiet_dcp():
            dcp.load(state, checkpoint_id=str(directory))
        # The checkpoint's groups list the whole model; this rank's optimizer knows its own.
        for group, names in zip(state["optim"]["param_groups"], local, strict=True):
            group["params"] = names
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


def build_schedule(
    cfg: Config, stages: list[PipelineStage], loss_fn
) -> torch_schedules._PipelineSchedule:
    row = PP_SCHEDULES[cfg.parallel.pp_schedule]
    cls = getattr(torch_schedules, row.torch_class)
    target = stages if row.multi_stage else stages[0]
    return cls(target, n_microbatches=microbatches(cfg), loss_fn=loss_fn, scale_grads=False)


def build_pipeline_engine(
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh,
    device: torch.device,
    init_from: Path | None = None,
    model: Transformer | None = None,
) -> PipelineEngine:
    """The engine of a run with parallel.pp > 1. `model`: preflight's meta-device full model
    (for the optimizer groups of the checkpoint), built here when not given."""
    par = cfg.parallel
    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg.model, loss=cfg.train.loss)
    split = split_stages(
        cfg.model, dims.pp, par.pp_virtual_stages, par.pp_schedule, cfg.data.seq_len
    )
    rank = dist.get_rank()
    if rank == 0:
        print(describe_split(split), flush=True)
    pp_rank = dims.pp_rank(rank)
    mine = [s for s in split if s.rank == pp_rank]
    stage_models = []
    for stage in mine:
        with torch.device("meta"):
            stage_model = StageModel(cfg.model, cfg.train.loss, stage)
        stage_models.append(parallelize_stage(stage_model, cfg, dims, mesh, device))
    pp_group = mesh["pp"].get_group()
    pipeline_stages = [
        PipelineStage(m, m.stage.index, len(split), device, group=pp_group) for m in stage_models
    ]
    local = LocalStages(stage_models)
    if init_from is not None:
        checkpoint.load_model_weights(init_from, local, cfg.model)
    optimizer = build_optimizer(local, cfg.optim)
    engine = PipelineEngine(
        stage_models,
        local,
        optimizer,
        cfg,
        dims,
        pp_group,
        group_names(model, cfg),
    )
    engine.schedule = build_schedule(cfg, pipeline_stages, engine.loss_fn)
    return engine
