"""Builds megalite's ZeRO-3 model on a real gloo group and reports what it holds. Usage:

    torchrun --standalone --nproc_per_node=N tests/parallel/zero3_driver.py cases.json out.json

cases.json: a list of {"name", "kind", "overrides"}; rank 0 writes one result per case to
out.json.
- kind "rss": the peak resident memory each rank gains while `deepspeed.materialize` builds the
  model under ZeRO-3 (after a warm-up build of the "warmup_overrides" model), then while the
  same model is materialized whole (what zero1/2, and ZeRO-3 before, do), and while
  `deepspeed.build` adds the engine; with the model's size.
- kind "weights": `deepspeed.build` under ZeRO-3; the largest difference between its gathered
  initial weights and those of one process (or of the checkpoint given by "init_seed": a DCP
  checkpoint of a model initialized from that seed), and the losses of a few steps next to
  those of the one-process model (fp32, same clipping) on the same global batch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megalite.compose import compose_config  # noqa: E402
from megalite.model.transformer import build_model, canonical_name, count_params  # noqa: E402
from megalite.optim import build_optimizer, param_groups  # noqa: E402
from megalite.parallel import deepspeed as ds  # noqa: E402
from megalite.parallel.dims import ParallelDims  # noqa: E402
from megalite.rundir import write_meta  # noqa: E402

STEPS = 3
SEQ = 16
CPU = torch.device("cpu")


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def peak_growth_mib(fn) -> tuple[object, float]:
    """Runs fn(); returns its result and how far the resident set rose above where it started,
    at its highest (VmHWM, reset first through /proc/self/clear_refs)."""
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = fn()
    return out, (_status_kib("VmHWM") - before) / 1024


def rss_case(cfg, warmup_cfg, world: int) -> dict:
    # DeepSpeed's first zero.Init imports modules and sets up state once per process (~45 MiB
    # here): done first, on a tiny model, so the measurement sees the model only.
    ds.materialize(warmup_cfg, ParallelDims.from_config(warmup_cfg.parallel, world), 2 * world, CPU)
    dims = ParallelDims.from_config(cfg.parallel, world)
    batch = cfg.train.micro_batch_size * world
    model, zero3 = peak_growth_mib(lambda: ds.materialize(cfg, dims, batch, CPU))
    n_params = sum(p.ds_numel for p in {id(p): p for p in model.parameters()}.values())
    del model
    whole_dims = ParallelDims("single", 1, 1, 1)  # materialize builds zero1/2 models whole
    whole_model, whole = peak_growth_mib(lambda: ds.materialize(cfg, whole_dims, batch, CPU))
    assert count_params(whole_model) == n_params
    del whole_model
    engine, with_engine = peak_growth_mib(lambda: ds.build(cfg, dims, batch, CPU))
    del engine
    return {
        "model_mib": n_params * 4 / 2**20,
        "zero3_materialize_mib": zero3,
        "whole_materialize_mib": whole,
        "zero3_build_with_engine_mib": with_engine,
    }


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[canonical_name(name)] = p.detach().clone()
    return out


def write_checkpoint(cfg, seed: int, path: Path) -> torch.nn.Module:
    """What `megalite-convert` or a DCP run leaves: weights under "model", and meta.json."""
    import torch.distributed.checkpoint as dcp

    model = build_model(cfg.model, loss=cfg.train.loss, seed=seed)
    if dist.get_rank() == 0:
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
        write_meta(path, step=0, tokens=0, world_size=1, engine="dcp", model=cfg.model)
    dist.barrier()
    return model


def weights_case(cfg, world: int, case: dict, tmp: Path) -> dict:
    rank = dist.get_rank()
    dims = ParallelDims.from_config(cfg.parallel, world)
    micro = cfg.train.micro_batch_size
    init_from = None
    if "init_seed" in case:
        init_from = tmp / f"{case['name']}_ckpt"
        ref = write_checkpoint(cfg, case["init_seed"], init_from)
    else:
        ref = build_model(cfg.model, loss=cfg.train.loss, seed=cfg.train.seed)
    engine = ds.build(cfg, dims, micro * world, CPU, init_from=init_from).model
    got = gathered(engine.module)
    want = dict(ref.named_parameters())
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    # Drawn in fp32, then cast: what the engine's own cast of an fp32 model gives.
    init_diff = max(
        (got[n].float() - want[n].to(got[n].dtype).float()).abs().max().item() for n in got
    )
    rounding = max((want[n].to(got[n].dtype).float() - want[n]).abs().max().item() for n in got)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro * world, SEQ + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    rows = slice(rank * micro, (rank + 1) * micro)
    losses = []
    for _ in range(STEPS):
        loss = engine(x[rows], y[rows])
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    ref_opt = build_optimizer(ref, cfg.optim)
    ref_losses = []
    for _ in range(STEPS):
        loss = ref(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())
    return {
        "param_dtype": str(next(iter(got.values())).dtype),
        "rope_dtype": str(engine.module.rope.dtype),
        # Weight decay: which parameters get it is read from their shapes (flat under ZeRO-3).
        "group_sizes": [len(g["params"]) for g in param_groups(engine.module, cfg.optim)],
        "single_group_sizes": [len(g["params"]) for g in param_groups(ref, cfg.optim)],
        "checkpointed_blocks": sum(
            type(m).__name__ == "CheckpointWrapper" for m in engine.module.modules()
        ),
        "init_max_abs_diff": init_diff,
        "cast_rounding": rounding,
        "losses": losses,
        "single_losses": ref_losses,
    }


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    try:
        for case in cases:
            cfg = compose_config(case["overrides"])
            if case["kind"] == "rss":
                result = rss_case(cfg, compose_config(case["warmup_overrides"]), world)
                # Every rank's figure: the test judges the worst.
                per_rank = [None] * world
                dist.all_gather_object(per_rank, result)
                results[case["name"]] = per_rank
            else:
                results[case["name"]] = weights_case(cfg, world, case, out.parent)
            dist.barrier()
        if dist.get_rank() == 0:
            out.write_text(json.dumps(results, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
