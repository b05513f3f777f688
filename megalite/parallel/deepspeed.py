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

    python -m megalite.parallel.deepspeed runs/x/checkpoints/step_00000100 runs/x/dcp_step_100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite import checkpoint
from megalite.config import Config, ModelConfig
from megalite.model.transformer import Transformer
from megalite.optim import build_optimizer
from megalite.parallel.checkpointing import apply_ac
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import compile_blocks, parallelize

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
    stage = int(cfg.parallel.strategy.removeprefix("zero"))
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
) -> tuple[Any, torch.optim.Optimizer]:
    """Builds the model (`materialize`), megalite's AdamW over it, and the engine; returns
    (engine, engine optimizer). The engine's `.module` is the model."""
    model = materialize(cfg, dims, global_batch, device, init_from)
    optimizer = build_optimizer(model, cfg.optim)
    return build_engine(model, optimizer, cfg, global_batch, device)


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
    if dims.strategy == "zero3":
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
    import warnings

    import torch.distributed.checkpoint as dcp

    full = {
        n: torch.empty(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # This rank alone reads: no_dist keeps DCP from running collectives on the others.
        dcp.load({"model": full}, checkpoint_id=str(init_from), no_dist=True)
    for name, p in params.items():
        p.copy_(full[name])


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    global_batch: int,
    device: torch.device,
):
    """Wraps a model and its optimizer; returns (engine, engine optimizer)."""
    deepspeed = _init(device)
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config(cfg, global_batch),
        dist_init_required=False,
    )
    return engine, ds_optimizer


def train_step(
    engine, micro_batches, grad_accum_steps: int, poison: float = 1.0
) -> tuple[torch.Tensor, float]:
    """One optimizer step; returns (sum of micro-batch losses, global grad norm). `poison` is
    the loss guard tests' failpoint (1.0 outside tests)."""
    loss_sum = torch.zeros((), device=engine.device)
    for x, y, _ in micro_batches:
        loss = engine(x, y) * poison
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
    norm = engine.get_global_grad_norm()
    norm = float(norm.item() if isinstance(norm, torch.Tensor) else (norm or 0.0))
    return loss_sum, norm


def save(engine, tmp: Path) -> None:
    """Writes DeepSpeed's checkpoint files into `tmp` (a collective on every rank)."""
    engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)


def load(engine, path: Path) -> None:
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {str(path)!r}")


def convert_to_dcp(ds_dir: Path, out: Path) -> None:
    """A DeepSpeed ZeRO checkpoint (a step_N dir written by megalite) -> a DCP checkpoint of
    the fp32 model weights, loadable under any layout (`train.init_from`, `megalite-eval`)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    _import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta_path = ds_dir / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{str(ds_dir)!r} has no meta.json: not a megalite checkpoint dir")
    meta = json.loads(meta_path.read_text())
    if meta.get("engine") != ENGINE:
        raise ValueError(f"{str(ds_dir)!r} was not written by DeepSpeed; it is already DCP")
    if out.exists():
        raise ValueError(f"output {str(out)!r} exists; choose a new directory")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    ModelConfig(**meta["model"])  # validates the recorded config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": {k: v.float() for k, v in state.items()}}, checkpoint_id=str(tmp))
    converted = dict(meta, engine="dcp", converted_from=str(ds_dir))
    (tmp / "meta.json").write_text(json.dumps(converted, indent=2) + "\n")
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megalite.parallel.deepspeed",
        description="convert a DeepSpeed ZeRO checkpoint to megalite's DCP format",
    )
    p.add_argument("checkpoint", type=Path, help="a step_N dir written by a zero1/2/3 run")
    p.add_argument("out", type=Path, help="new directory for the DCP checkpoint")
    args = p.parse_args(argv)
    try:
        convert_to_dcp(args.checkpoint, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
