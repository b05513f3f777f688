"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, layout-independent;
and the one loader every inference tool (megalite-eval, megalite-generate, megalite-convert
to-hf) uses. The files and their names are laid out in rundir.py.

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only after every rank has
finished, so a directory named `step_N` with a meta.json is always complete; `latest` is replaced
atomically after the rename. Model and optimizer state go through
`torch.distributed.checkpoint.state_dict`, which gives unsharded FQNs for any wrapper, so a
checkpoint written under one layout loads under another. Per-rank files hold only tensors and
plain Python values and are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megalite import rundir
from megalite.config import ModelConfig
from megalite.errors import CheckpointError, ConfigError
from megalite.model.transformer import Transformer
from megalite.parallel.distributed import DistInfo, barrier
from megalite.resilience import failpoint

if TYPE_CHECKING:  # engine.py imports this module
    from megalite.engine import Engine

# What defines the function a checkpoint's weights compute: parameter shapes, the RoPE base and
# scaling, and the norm epsilon. A checkpoint is loadable only if all of them match (the kernel
# backends and max_seq_len may differ).
MODEL_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "kv_heads",
    "hidden_dim",
    "tie_embeddings",
    "rope_theta",
    "rope_scaling_params",
    "norm_eps",
)


def _model_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in cfg.items() if k in known})
    return {k: getattr(model, k) for k in MODEL_FIELDS}


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
_DS_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_")


def _owner(name: str) -> int | None:
    """The rank that wrote a checkpoint file, from its name, or None for a shared file (rank 0
    writes those): DCP's `__<rank>_<n>.distcp`, megalite's `rank_<rank>.pt`, DeepSpeed's
    `[bf16_]zero_pp_rank_<rank>_mp_rank_*` (megalite's ZeRO has no model parallelism, so the
    data-parallel rank is the rank)."""
    for pattern in (_DCP_SHARD, rundir.RANK_FILE, _DS_SHARD):
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


def check_compatible(path: Path, cfg: ModelConfig, engine: str | None = None) -> dict[str, Any]:
    """Reads meta.json and refuses a checkpoint of a different model shape, naming every field,
    or (when `engine` is given) one written by the other engine (DCP vs DeepSpeed)."""
    meta = rundir.read_meta(path, "point train.resume at a step_N dir, or use train.resume=auto")
    try:
        saved = _model_fields(meta.get("model", {}))
    except (TypeError, ValueError) as e:
        where = str(path / rundir.META)
        raise CheckpointError(f"{where!r} holds no valid model config ({e})") from e
    want = _model_fields(asdict(cfg))
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
                f"convert it first (megalite-convert from-deepspeed {path} <new dir>) "
                "and start from it with train.init_from=<new dir>"
            )
        else:
            fix = "start a DeepSpeed run from its weights with train.init_from instead"
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by the {saved_engine} engine and cannot be "
            f"resumed by the {engine} engine; {fix}"
        )
    return meta


@contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP outside a process group warns that it saves / loads from one process: intended here
    (world size 1, conversions, inference)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint's DCP files hold: model + optimizer state under unsharded FQNs
    (loadable under any layout). The tensors alias the live ones (no copy)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Model + optimizer as DCP files."""
    with quiet_dcp():
        dcp.save(dcp_state_dict(model, optimizer), checkpoint_id=str(directory))


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Loads model + optimizer in place, resharding to the current layout."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def save(
    run_dir: str | Path,
    step: int,
    engine: Engine,
    trainer_state: dict[str, Any],
    model_cfg: ModelConfig,
    dist_info: DistInfo,
    keep_last: int,
) -> Path:
    """Writes a checkpoint atomically on every rank (a collective); returns its final path.
    The engine writes model + optimizer (DCP, or DeepSpeed's own files).
    checkpoint_async.AsyncSaver does the same in the background, from the same three parts."""
    final, tmp = begin_save(run_dir, step, dist_info)
    engine.save(tmp)
    failpoint("save_after_weights", step)
    write_rank_state(tmp, trainer_state, dist_info)
    # Every rank's files are durable before the barrier, so meta.json (the mark of a complete
    # checkpoint) is never on disk ahead of a shard.
    _fsync_own_files(tmp, dist_info.rank)
    barrier()
    failpoint("save_before_meta", step)
    if dist_info.is_main:
        commit(
            run_dir,
            step,
            tokens=trainer_state.get("tokens"),
            world_size=dist_info.world_size,
            engine_format=engine.checkpoint_format,
            model_cfg=model_cfg,
            keep_last=keep_last,
        )
    barrier()
    return final


def begin_save(run_dir: str | Path, step: int, dist_info: DistInfo) -> tuple[Path, Path]:
    """(final dir, staging dir) of the checkpoint of `step`; the staging dir is empty and exists
    on every rank when this returns (a collective)."""
    run = rundir.RunDir(run_dir)
    final, tmp = run.checkpoint(step), run.staging(step)
    if dist_info.is_main:
        if tmp.exists():  # a save that died earlier at this step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    return final, tmp


def write_rank_state(tmp: Path, trainer_state: dict[str, Any], dist_info: DistInfo) -> Path:
    """This rank's trainer state (step, tokens, data position) and RNG state, durable (fsync)
    when this returns."""
    rank_state = dict(trainer_state, rng=_rng_state(dist_info.device))
    path = rundir.rank_file(tmp, dist_info.rank)
    torch.save(rank_state, path)
    _fsync_file(path)
    return path


def commit(
    run_dir: str | Path,
    step: int,
    *,
    tokens: int | None,
    world_size: int,
    engine_format: str,
    model_cfg: ModelConfig,
    keep_last: int,
) -> Path:
    """Rank 0, once every rank's files in the staging dir are durable: meta.json (the mark of a
    complete checkpoint), the rename to step_N, `latest`, pruning. Touches files only (no
    collective), so a background thread may run it."""
    run = rundir.RunDir(run_dir)
    final, tmp = run.checkpoint(step), run.staging(step)
    meta = rundir.write_meta(
        tmp,
        step=step,
        tokens=tokens,
        world_size=world_size,
        engine=engine_format,
        model=model_cfg,
    )
    _fsync_file(meta)
    # The directory entries (DeepSpeed may write into subdirectories), deepest first.
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    _fsync_dir(tmp)
    failpoint("save_before_rename", step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    failpoint("save_before_latest", step)
    latest_tmp = run.latest.with_name(run.latest.name + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    latest_tmp.replace(run.latest)
    _fsync_dir(run.checkpoints)
    # Prune after the new checkpoint is complete: the newest is never deleted.
    failpoint("save_before_prune", step)
    for old in run.complete_checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def _damaged_as_error(ckpt: Path, name: str | None = None) -> Iterator[None]:
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        lines = [line for line in str(e).splitlines() if line.strip()]
        cause = lines[-1].strip()[:300] if lines else type(e).__name__
        what = f"{name} in {str(ckpt)!r}" if name else f"the weights of {str(ckpt)!r}"
        raise CheckpointError(
            f"cannot load {what} ({cause}); if the checkpoint is damaged, resume from an "
            "earlier step_N dir (train.resume=<dir>), or move it aside and use train.resume=auto"
        ) from e


def load(path: Path, engine: Engine, model_cfg: ModelConfig, dist_info: DistInfo) -> dict[str, Any]:
    """Loads model + optimizer in place (resharding as needed) and returns the trainer state of
    this rank (rank 0's when the world size changed: the data position is global)."""
    meta = check_compatible(path, model_cfg, engine.checkpoint_format)
    if not rundir.rank_file(path, 0).is_file():
        raise CheckpointError(
            f"{str(path)!r} holds model weights only (no optimizer or trainer state), so a run "
            f"cannot resume from it; start from its weights with train.init_from={path}"
        )
    rank_file = rundir.rank_file(path, dist_info.rank)
    same_world = meta.get("world_size") == dist_info.world_size
    if not same_world or not rank_file.is_file():
        rank_file = rundir.rank_file(path, 0)
    # Preflight checked the files' sizes and CRCs (resume.py); damage those miss surfaces here,
    # named, instead of as a raw reader traceback.
    with _damaged_as_error(path):
        engine.load(path)
    with _damaged_as_error(path, rank_file.name):
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
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return meta


# ------------------------------------------------------------------------ for inference
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a step_N dir, a megalite-convert output or a run dir (its newest
    complete checkpoint)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; give a step_N checkpoint dir, a run dir "
            "(its newest checkpoint is used) or a megalite-convert output dir"
        )
    if (p / rundir.META).is_file():
        return p
    run = rundir.RunDir(p)
    newest = run.newest_checkpoint()
    if newest is not None:
        return newest
    if run.checkpoints.is_dir():
        raise CheckpointError(
            f"run dir {str(p)!r} holds no complete checkpoint (checkpoints/step_N/meta.json); "
            "wait for the first checkpoint or pass a step_N dir"
        )
    raise CheckpointError(
        f"{str(p)!r} is neither a checkpoint (no meta.json) nor a run dir (no checkpoints/); "
        "give a step_N checkpoint dir, a run dir or a megalite-convert output dir"
    )


def inference_config(meta: dict[str, Any], ckpt: Path) -> ModelConfig:
    """The checkpoint's model, with the portable backends (SDPA attention, PyTorch norm): they do
    not change the weights, run on any device, and incremental decoding needs SDPA's masks."""
    where = str(ckpt / rundir.META)
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where!r} has no 'model' entry")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(
            f"{where!r} has model fields {unknown} this megalite does not know; "
            "use the megalite version that wrote the checkpoint"
        )
    try:
        return ModelConfig(**{**saved, "attention": "sdpa", "norm": "torch"})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where!r}: {e}") from e


def load_for_inference(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Transformer, dict[str, Any]]:
    """(the model in eval mode with the weights of the checkpoint at `path`, its meta.json).
    `path`: anything `resolve_checkpoint` takes. Any parallel layout loads, in one process with
    no process group (DCP reshards on load)."""
    ckpt = resolve_checkpoint(path)
    meta = rundir.read_meta(ckpt)
    cfg = inference_config(meta, ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    # No random init: every parameter is overwritten by the checkpoint; only buffers are computed.
    model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()
    # First: a DeepSpeed checkpoint gets its own message (and how to convert it).
    check_compatible(ckpt, cfg, engine="dcp")
    if not (ckpt / rundir.DCP_INDEX).is_file():
        raise CheckpointError(
            f"{str(ckpt)!r} has a meta.json but no .metadata (the DCP index of its tensors): the "
            "checkpoint is incomplete; use another step_N dir"
        )
    try:
        load_model_weights(ckpt, model, cfg)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        # DCP wraps the cause in a multi-line report; its last line names it.
        lines = [line for line in str(e).splitlines() if line.strip()]
        cause = lines[-1].strip()[:300] if lines else type(e).__name__
        raise CheckpointError(
            f"cannot load the weights of {str(ckpt)!r} ({cause}); the checkpoint is damaged, "
            "use another step_N dir"
        ) from e
    return model.eval(), meta
