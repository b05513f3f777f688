"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, layout-independent.

    <run_dir>/checkpoints/step_00000400/
        .metadata, __*_*.distcp   model + optimizer, written by DCP (sharded, reshardable)
        rank_00000.pt ...         per-rank trainer state: RNG states, data-stream position
        meta.json                 step, tokens, world size, model config (written last)
    <run_dir>/checkpoints/latest  name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only after every rank has
finished, so a directory named `step_N` with a meta.json is always complete; `latest` is replaced
atomically after the rename. Model and optimizer state go through
`torch.distributed.checkpoint.state_dict`, which gives unsharded FQNs for any wrapper, so a
checkpoint written under one layout loads under another. Per-rank files hold only tensors and
plain Python values and are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megalite.config import ModelConfig
from megalite.parallel.distributed import DistInfo, barrier
from megalite.resilience import failpoint

# What defines the function a checkpoint's weights compute: parameter shapes, and the RoPE base
# and norm epsilon. A checkpoint is loadable only if all of them match (the kernel backends and
# max_seq_len may differ).
MODEL_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "kv_heads",
    "hidden_dim",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)


def _model_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in cfg.items() if k in known})
    return {k: getattr(model, k) for k in MODEL_FIELDS}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path, the problem and the fix."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written `.tmp` dir is never listed)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("step_")
        and p.name[5:].isdigit()
        and (p / "meta.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def newest_complete(run_dir: str | Path) -> Path | None:
    found = list_complete(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


_DCP_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")
_DS_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_")


def _owner(name: str) -> int | None:
    """The rank that wrote a checkpoint file, from its name, or None for a shared file (rank 0
    writes those): DCP's `__<rank>_<n>.distcp`, megalite's `rank_<rank>.pt`, DeepSpeed's
    `[bf16_]zero_pp_rank_<rank>_mp_rank_*` (megalite's ZeRO has no model parallelism, so the
    data-parallel rank is the rank)."""
    for pattern in (_DCP_SHARD, _RANK_FILE, _DS_SHARD):
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def _fsync_own_files(tmp: Path, rank: int) -> None:
    """fsync what this rank wrote. fsync flushes only the calling process's dirty pages on many
    network filesystems, and one rank syncing every rank's files would serialize the whole
    checkpoint (850 GB for 70B) behind one node's bandwidth: each rank syncs its own shards, in
    parallel; rank 0 also the shared files (DCP's .metadata, DeepSpeed's model states)."""
    for f in tmp.rglob("*"):
        if f.is_file() and (_owner(f.name) == rank or (_owner(f.name) is None and rank == 0)):
            _fsync_file(f)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def model_meta(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg)


def check_compatible(path: Path, cfg: ModelConfig, engine: str | None = None) -> dict[str, Any]:
    """Reads meta.json and refuses a checkpoint of a different model shape, naming every field,
    or (when `engine` is given) one written by the other engine (DCP vs DeepSpeed)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a complete megalite checkpoint (no meta.json); "
            "point train.resume at a step_N dir, or use train.resume=auto"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(meta_path)!r} is not valid JSON ({e})") from e
    try:
        saved = _model_fields(meta.get("model", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(meta_path)!r} holds no valid model config ({e})") from e
    want = _model_fields(model_meta(cfg))
    names = {"kv_heads": "n_kv_heads", "hidden_dim": "ffn_dim"}
    diffs = [
        f"model.{names.get(k, k)}: checkpoint {saved[k]!r}, config {want[k]!r}"
        for k in MODEL_FIELDS
        if saved[k] != want[k]
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for a different model shape ("
            + "; ".join(diffs)
            + "); use the same model config, or a fresh train.run_dir"
        )
    saved_engine = meta.get("engine", "dcp")
    if engine is not None and saved_engine != engine:
        if saved_engine == "deepspeed":
            fix = (
                f"convert it first (python -m megalite.parallel.deepspeed {path} <new dir>) "
                "and start from it with train.init_from=<new dir>"
            )
        else:
            fix = "start a DeepSpeed run from its weights with train.init_from instead"
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by the {saved_engine} engine and cannot be "
            f"resumed by the {engine} engine; {fix}"
        )
    return meta


def save(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    model_cfg: ModelConfig,
    dist_info: DistInfo,
    keep_last: int,
    engine: Any = None,
) -> Path:
    """Writes a checkpoint atomically on every rank (a collective); returns its final path.
    With a DeepSpeed `engine`, model and optimizer are written by DeepSpeed instead of DCP."""
    root = ckpt_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if dist_info.is_main:
        if tmp.exists():  # a save that died earlier at this step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if engine is not None:
        from megalite.parallel import deepspeed as ds

        ds.save(engine, tmp)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            # Without a process group DCP warns that it saves from a single process: intended.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    failpoint("save_after_weights", step)
    rank_state = dict(trainer_state, rng=_rng_state(dist_info.device))
    torch.save(rank_state, tmp / f"rank_{dist_info.rank:05d}.pt")
    # Every rank's files are durable before the barrier, so meta.json (the mark of a complete
    # checkpoint) is never on disk ahead of a shard.
    _fsync_own_files(tmp, dist_info.rank)
    barrier()
    failpoint("save_before_meta", step)
    if dist_info.is_main:
        meta = {
            "step": step,
            "tokens": trainer_state.get("tokens"),
            "world_size": dist_info.world_size,
            "engine": "deepspeed" if engine is not None else "dcp",
            "model": model_meta(model_cfg),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_file(tmp / "meta.json")
        # The directory entries (DeepSpeed may write into subdirectories), deepest first.
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        _fsync_dir(tmp)
        failpoint("save_before_rename", step)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        failpoint("save_before_latest", step)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        _fsync_file(latest_tmp)
        latest_tmp.replace(root / "latest")
        _fsync_dir(root)
        # Prune after the new checkpoint is complete: the newest is never deleted.
        failpoint("save_before_prune", step)
        for old in list_complete(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_cfg: ModelConfig,
    dist_info: DistInfo,
    engine: Any = None,
) -> dict[str, Any]:
    """Loads model + optimizer in place (resharding as needed) and returns the trainer state of
    this rank (rank 0's when the world size changed: the data position is global)."""
    meta = check_compatible(path, model_cfg, "deepspeed" if engine is not None else "dcp")
    if not (path / "rank_00000.pt").is_file():
        raise CheckpointError(
            f"{str(path)!r} holds model weights only (no optimizer or trainer state), so a run "
            f"cannot resume from it; start from its weights with train.init_from={path}"
        )
    if engine is not None:
        from megalite.parallel import deepspeed as ds

        ds.load(engine, path)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    rank_file = path / f"rank_{dist_info.rank:05d}.pt"
    same_world = meta.get("world_size") == dist_info.world_size
    if not same_world or not rank_file.is_file():
        rank_file = path / "rank_00000.pt"
    trainer_state = torch.load(rank_file, weights_only=True)
    if same_world:
        _set_rng_state(trainer_state["rng"], dist_info.device)
    trainer_state["meta"] = meta
    return trainer_state


def load_model_weights(path: Path, model: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    """Loads only the model weights of a checkpoint (any layout, or one written by
    `megalite-convert`), for `train.init_from`: optimizer, step and data position start fresh."""
    meta = check_compatible(path, model_cfg, engine="dcp")
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return meta
