"""Applies megalite's FSDP layout on a real gloo group and reports it. Usage:

    torchrun --standalone --nproc_per_node=2 tests/parallel/fsdp_units_driver.py cases.json out.json

cases.json: a list of {"name", "overrides", "partial_group_forward"}. For each case, rank 0
writes to out.json: the FSDP units (module names sharing one FSDP state), which units still
hold whole (unsharded) parameters after a forward with gradients enabled, and the losses of a
few optimizer steps next to those of the same model trained in one process on the same batch.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from megalite.compose import compose_config
from megalite.model.transformer import Transformer, build_model
from megalite.optim import build_optimizer
from megalite.parallel import fsdp
from megalite.parallel.dims import ParallelDims
from megalite.parallel.parallelize import parallelize

STEPS = 3
BATCH, SEQ = 4, 16  # global batch: each of the 2 ranks takes 2 rows


def units(model: torch.nn.Module) -> dict[str, list[str]]:
    """FSDP units: the first module name of each ("" is the root) -> the names of the modules
    that share its FSDP state, in module order."""
    groups: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            groups.setdefault(id(fully_shard.state(module)), []).append(name)
    return {names[0]: names for names in groups.values()}


def owner(param_name: str, unit_modules: dict[str, str]) -> str:
    """The unit managing a parameter: the one of its deepest enclosing FSDP module."""
    parts = param_name.split(".")[:-1]
    for i in range(len(parts), -1, -1):
        if (prefix := ".".join(parts[:i])) in unit_modules:
            return unit_modules[prefix]
    raise AssertionError(f"{param_name} is in no FSDP unit")


def whole_after_forward(model: torch.nn.Module) -> list[str]:
    """The units whose parameters are still unsharded (plain tensors, not DTensor shards) after
    a forward with gradients enabled: those with reshard_after_forward=False."""
    unit_modules = {m: first for first, names in units(model).items() for m in names}
    whole: dict[str, list[bool]] = {}
    for name, p in model.named_parameters():
        whole.setdefault(owner(name, unit_modules), []).append(not isinstance(p, DTensor))
    for unit, flags in whole.items():
        assert all(flags) or not any(flags), f"unit {unit!r} is partly unsharded"
    return [unit for unit, flags in whole.items() if all(flags)]


def run_case(case: dict, rank: int, world: int) -> dict:
    fsdp.PARTIAL_GROUP_FORWARD = case["partial_group_forward"]
    cfg = compose_config(case["overrides"])
    dims = ParallelDims.from_config(cfg.parallel, world)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(cfg.model, loss=cfg.train.loss)
    model = parallelize(model, cfg, dims, mesh, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    # One batch, seen at every step: the loss must fall.
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + 1), generator=gen)
    x, y = tokens[..., :-1], tokens[..., 1:]
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

    opt = build_optimizer(model, cfg.optim)
    losses, whole = [], None
    for _ in range(STEPS):
        loss = model(x[rows], y[rows])
        if whole is None:
            whole = whole_after_forward(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    ref_losses = []
    if rank == 0:
        ref = build_model(cfg.model, loss=cfg.train.loss, seed=cfg.train.seed)
        ref_opt = build_optimizer(ref, cfg.optim)
        for _ in range(STEPS):
            loss = ref(x, y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(loss.item())
    return {
        "units": units(model),
        "whole_after_forward": whole,
        "losses": losses,
        "single_losses": ref_losses,
    }


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {}
        for case in cases:
            results[case["name"]] = run_case(case, rank, world)
            dist.barrier()
        if rank == 0:
            with open(sys.argv[2], "w") as f:
                json.dump(results, f, indent=2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
