"""DeepSpeed ZeRO (stages 1-3) as an alternative engine: `parallel=zero1|zero2|zero3`.

`build` makes the model, its optimizer and the engine. The model is the same single-device
Transformer with the same initial weights as every other layout (each parameter drawn from
(seed, name)); DeepSpeed wraps it together with megalite's own AdamW (parameter groups and
all), so the optimizer math matches the other strategies.

ZeRO-1/2 replicate the parameters anyway, so they materialize the whole model on every rank.
ZeRO-3 never does: the model is built under `deepspeed.zero.Init`, which partitions each
module's parameters as soon as the module is constructed, and the weights are then written one
top-level module (the embedding, a block, the norm, the head) at a time, gathered only for
that (`GatheredParameters`). A 70B model in fp32 is 263 GiB whole; a rank now holds its 1/world
share plus, briefly, one gathered block (3.2 GiB in fp32) or the embedding (3.9 GiB).

DeepSpeed owns gradient accumulation (its `backward` scales by 1/accum and `step` applies the
update on the last micro-batch), clipping (`gradient_clipping`) and bf16 (`bf16.enabled`: bf16
parameters and gradients in the model, fp32 master weights and optimizer state in its optimizer
wrapper).

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`), written into `step_N.tmp/` and
renamed like every megalite checkpoint. `convert_to_dcp` turns one into the common DCP format
(model weights, fp32) that `train.init_from`, `megalite-eval` and any other layout load:

    megalite-convert from-deepspeed runs/x/checkpoints/step_00000100 runs/x/dcp_step_100
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite import checkpoint
from megalite.config import Config, ModelConfig
from megalite.errors import CheckpointError, ConfigError
from megalite.model.transformer import Transformer
from megalite.optim import build_optimizer
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import compile_blocks, parallelize
from megalite.rundir import read_meta, write_meta
from megalite.strategies import STRATEGIES

ENGINE = "deepspeed"


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator at import time; on a CPU it must be told.
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # The CPU accelerator otherwise JIT-compiles a shared-memory all-reduce op at start-up
    # (1-2 minutes); gloo's collectives are enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: Config, global_batch: int) -> dict[str, Any]:
    stage = STRATEGIES[cfg.parallel.strategy].zero_stage
    dim = cfg.model.dim
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            # Buckets sized to the model (Hugging Face's "auto" rule) instead of DeepSpeed's
            # 5e8-element defaults, which cost 2 GB per rank however small the model is.
            "reduce_bucket_size": dim * dim,
            "allgather_bucket_size": dim * dim,
            "stage3_prefetch_bucket_size": int(0.9 * dim * dim),
            "stage3_param_persistence_threshold": 10 * dim,
            # Keep full fp32 weights gatherable at save time for conversion.
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        # megalite's own AdamW is the client optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build(
    cfg: Config,
    dims: ParallelDims,
    global_batch: int,
    device: torch.device,
    init_from: Path | None = None,
) -> DeepSpeedEngine:
    """Builds the model (`materialize`), megalite's AdamW over it, and the DeepSpeed engine
    around both. The engine's `.module` is the model."""
    model = materialize(cfg, dims, global_batch, device, init_from)
    deepspeed = _init(device)
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg.optim),
        config=ds_config(cfg, global_batch),
        dist_init_required=False,
    )
    return DeepSpeedEngine(engine, ds_optimizer)


def materialize(
    cfg: Config,
    dims: ParallelDims,
    global_batch: int,
    device: torch.device,
    init_from: Path | None = None,
) -> Transformer:
    """The model as the strategy holds it before the engine wraps it, with its initial weights,
    or those of the DCP checkpoint `init_from`: whole on every rank for zero1/2, partitioned
    from construction on for zero3."""
    deepspeed = _init(device)
    if STRATEGIES[dims.strategy].zero_stage == 3:
        return _build_partitioned(deepspeed, cfg, ds_config(cfg, global_batch), init_from)
    with torch.device("meta"):
        model = Transformer(cfg.model, loss=cfg.train.loss)
    model = parallelize(model, cfg, dims, None, device)
    if init_from is not None:
        checkpoint.load_model_weights(init_from, model, cfg.model)
    return model


def _init(device: torch.device):
    deepspeed = _import_deepspeed(device)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False
    )
    return deepspeed


def _build_partitioned(
    deepspeed, cfg: Config, config: dict[str, Any], init_from: Path | None
) -> Transformer:
    """The model under ZeRO-3 partitioning from the start, holding the same weights as every
    other layout: its initial values, or those of the DCP checkpoint `init_from`."""
    # zero.Init creates each parameter in the compute dtype (bf16 under train.precision=bf16,
    # as the engine would cast it) on this rank's device, and keeps 1/world of it.
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Transformer(cfg.model, loss=cfg.train.loss)
    # zero.Init also creates buffers in the compute dtype; the engine keeps them fp32 (the RoPE
    # table in bf16 would round positions above 256), as every other layout does.
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(module, name, buf.float())
    model.init_buffers()
    if init_from is not None:
        checkpoint.check_compatible(init_from, cfg.model, engine="dcp")
    rank, world = dist.get_rank(), dist.get_world_size()
    # One top-level module (embedding, block, norm, head) at a time: gathered whole on every
    # rank, written by one rank (in turn, to spread the reading or drawing), broadcast from
    # it and partitioned again on leaving the context.
    seen: set[int] = set()
    for i, (prefix, unit) in enumerate(_top_level_modules(model)):
        params = {}
        for name, p in unit.named_parameters(prefix=prefix):
            if id(p) not in seen:  # a tied output weight was written with the embedding
                seen.add(id(p))
                params[name] = p
        if not params:
            continue
        writer = i % world
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=writer):
            if rank == writer:
                _write_full(model, params, cfg.train.seed, init_from)
    assert seen == {id(p) for p in model.parameters()}, "a parameter outside the modules written"
    # As parallelize does for the other layouts, after the weights are written under their
    # plain names (checkpoint_wrapper renames them).
    apply_ac(model, cfg.parallel.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model)
    return model


def _top_level_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's children, with a container of blocks (`layers`) split into its blocks."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            out += [(f"{name}.{sub}", block) for sub, block in child.named_children()]
        else:
            out.append((name, child))
    return out


@torch.no_grad()
def _write_full(
    model: Transformer, params: dict[str, nn.Parameter], seed: int, init_from: Path | None
) -> None:
    """Writes full values into gathered parameters, drawn in fp32 and cast on copy, as the
    other layouts initialize fp32 master weights that the engine casts."""
    if init_from is None:
        for name, p in params.items():
            p.copy_(model.initial_value(name, p.shape, p.device, torch.float32, seed))
        return

    import torch.distributed.checkpoint as dcp

    full = {
        n: torch.empty(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }
    with checkpoint.quiet_dcp():
        # This rank alone reads: no_dist keeps DCP from running collectives on the others.
        dcp.load({"model": full}, checkpoint_id=str(init_from), no_dist=True)
    for name, p in params.items():
        p.copy_(full[name])


class DeepSpeedEngine:
    """megalite's engine interface (engine.py) over a DeepSpeed engine. DeepSpeed applies the
    update inside `engine.step()` on the last micro-batch, so the loss guard can count a bad step
    and roll back, not skip it."""

    checkpoint_format = ENGINE

    def __init__(self, engine, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = engine, optimizer

    def forward_backward(
        self, micro_batches, poison: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), device=self.model.device)
        for x, y in micro_batches:
            loss = self.model(x, y)
            if poison is not None:  # test machinery (resilience.Faults)
                loss = loss * poison
            self.model.backward(loss)
            self.model.step()
            loss_sum += loss.detach().float()
        norm = self.model.get_global_grad_norm()
        if not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float(norm or 0.0))
        return loss_sum, norm.to(self.model.device).float()

    def optimizer_step(self, apply: bool) -> None:
        """Nothing left to do: DeepSpeed stepped (and zeroed the gradients) in engine.step()."""

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).float()

    def save(self, directory: Path) -> None:
        """DeepSpeed's checkpoint files, in `directory` (a collective on every rank)."""
        self.model.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load(self, directory: Path) -> None:
        load_path, _ = self.model.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {str(directory)!r}")


def convert_to_dcp(ds_dir: Path, out: Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO checkpoint (a step_N dir written by megalite) -> a DCP checkpoint of
    the fp32 model weights, loadable under any layout (`train.init_from`, `megalite-eval`).
    Returns the meta.json written. `megalite-convert from-deepspeed` runs it."""

    import torch.distributed.checkpoint as dcp

    meta = read_meta(ds_dir, "give a step_N dir written by a zero1/2/3 run")
    if meta.get("engine") != ENGINE:
        raise CheckpointError(f"{str(ds_dir)!r} was not written by DeepSpeed; it is already DCP")
    if out.exists():
        raise CheckpointError(f"output {str(out)!r} exists; choose a new directory")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "reading a DeepSpeed checkpoint needs DeepSpeed, which is not installed; "
            "`pip install megalite[deepspeed]`"
        )
    _import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    model = ModelConfig(**meta["model"])  # validates the recorded config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with checkpoint.quiet_dcp():
        dcp.save({"model": {k: v.float() for k, v in state.items()}}, checkpoint_id=str(tmp))
    recorded = ("step", "tokens", "world_size", "engine", "model")
    extra = {k: v for k, v in meta.items() if k not in recorded}
    write_meta(
        tmp,
        step=meta.get("step"),
        tokens=meta.get("tokens"),
        world_size=meta.get("world_size"),
        engine="dcp",
        model=model,
        **extra,
        converted_from=str(ds_dir),
    )
    tmp.rename(out)
    return read_meta(out)
