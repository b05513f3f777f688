"""Preflight: everything that can be checked before a process group, a model or a data stream
exists — and every problem found is reported together, so a typo found after the queue wait
costs one resubmission, not five.

Checks: parallel degrees against the world size and the batch arithmetic; the dataset (present,
readable, tokenizer matching the model); the kernels and backends the config asks for (and
`auto` backends and precision made concrete for the device), by building the model on the meta
device, which the trainer then parallelizes; the checkpoint to resume or start from (present,
same model shape, same engine); the run dir (writable, with room for at least one checkpoint);
wandb (offline, or online with a key and a reachable server). The config itself was fully
validated when it was built.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from megalite import checkpoint
from megalite.backends import needing_cuda
from megalite.checkpoint_async import async_problems
from megalite.config import Config, ConfigError
from megalite.data.loader import check_dataset
from megalite.demo_checks import demo_warnings
from megalite.devices import resolve_precision
from megalite.errors import MegaliteError
from megalite.model.transformer import Transformer, count_params, resolve_backends
from megalite.parallel.context import check_cp_device
from megalite.parallel.dims import ParallelDims, check_world_size
from megalite.parallel.float8 import float8_problems
from megalite.resume import resolve_resume
from megalite.rundir import rank_file
from megalite.shapes import checkpoint_bytes


class PreflightError(ConfigError):
    """One or more problems found before start; `problems` lists each one's message."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{len(problems)} problems found before start:\n{lines}")


@dataclass
class Plan:
    """What preflight established, for the trainer to use."""

    cfg: Config  # with concrete backends and precision (bf16 or fp32)
    global_batch: int
    dims: ParallelDims
    # The model, built on the meta device with cfg's backends: the trainer parallelizes and
    # materializes it (DeepSpeed builds its own, partitioned as it is built).
    model: Transformer
    manifest: dict
    resume_from: Path | None
    n_params: int
    # One line saying which precision the run uses and why (`train.precision=auto` resolved for
    # this device), for the trainer to print once at start.
    precision_reason: str = ""
    # Lines the trainer prints as warnings at start (a damaged checkpoint skipped by
    # train.resume=auto, a demo dataset under a large model).
    warnings: list[str] = dataclasses.field(default_factory=list)


def check_run_dir(run_dir: Path, n_params: int) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"train.run_dir={str(run_dir)!r}: {str(existing)!r} is a file, not a directory; "
            "choose another train.run_dir"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".megalite-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"train.run_dir={str(run_dir)!r} is not writable ({e.strerror} in {str(existing)!r});"
            " choose a directory you can write to"
        ) from e
    need, free = checkpoint_bytes(n_params), shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(
            f"train.run_dir={str(run_dir)!r}: {free / 2**30:.1f} GiB free but one checkpoint "
            f"needs about {need / 2**30:.1f} GiB; free space or choose another train.run_dir"
        )


def check_wandb(mode: str) -> None:
    if mode != "online":
        return
    has_netrc = (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text(errors="ignore")
    if not os.environ.get("WANDB_API_KEY") and not has_netrc:
        raise ConfigError(
            "logging.wandb.mode=online but no wandb credentials (WANDB_API_KEY or ~/.netrc); "
            "set WANDB_API_KEY, or use logging.wandb.mode=offline and `wandb sync` later"
        )
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"logging.wandb.mode=online but {host}:{port} is unreachable ({e}); "
            "use logging.wandb.mode=offline and `wandb sync` later"
        ) from e


def backends_the_device_cannot_run(cfg: Config, device_type: str) -> list[str]:
    """A Triton kernel or flash-attn chosen on a CPU would fail at the first step, minutes in.
    (TRITON_INTERPRET=1 runs Triton kernels on a CPU, slowly, to check their numerics: allowed.)"""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    m = cfg.model
    return [
        f"{choice.key}={value} {why}; this run is on a CPU: use "
        f"{choice.key}={choice.auto(device_type, 1)} (or auto)"
        for choice, value, why in needing_cuda(m.attention, m.norm, cfg.train.loss, device_type)
    ]


def preflight(cfg: Config, world_size: int) -> Plan:
    """Runs every check; raises PreflightError listing all problems, or returns the Plan."""
    problems: list[str] = []
    device_type = "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    tp = 1

    def attempt(fn, *args):
        try:
            return fn(*args)
        except MegaliteError as e:
            problems.append(str(e))
            return None

    # The degrees, resolved once here and handed down (the trainer and the memory plan take dims).
    dims = attempt(ParallelDims.from_config, cfg.parallel, world_size)
    global_batch = None if dims is None else attempt(check_world_size, cfg, dims)
    if global_batch is None:
        dims = None  # a layout that fails its checks selects no backend or engine below
    else:
        tp = dims.tp
    # `auto` backends and precision become concrete ones for this device and layout, once, here.
    # Under pipeline parallelism the last stage computes the loss from its logits: `auto`
    # means the torch loss there, never the fused linear + cross-entropy kernel.
    loss_choice = "torch" if cfg.parallel.pp > 1 and cfg.train.loss == "auto" else cfg.train.loss
    model_cfg, loss = resolve_backends(cfg.model, loss_choice, device_type, tp)
    precision, precision_reason = resolve_precision(cfg.train.precision, device_type)
    train = dataclasses.replace(cfg.train, loss=loss, precision=precision)
    cfg = dataclasses.replace(cfg, model=model_cfg, train=train)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        problems.append(
            "train.device=cuda but CUDA is not available here; use train.device=cpu or auto"
        )
    problems += backends_the_device_cannot_run(cfg, device_type)
    deepspeed = dims is not None and dims.uses_deepspeed
    problems += float8_problems(cfg, device_type, tp, deepspeed)
    problems += async_problems(cfg, world_size, deepspeed)
    if dims is not None:  # ring attention: CUDA and SDPA only (parallel/context.py)
        attempt(check_cp_device, cfg, device_type, dims.cp)
    manifest = attempt(check_dataset, cfg.data, cfg.model)

    def build_meta() -> Transformer:
        # Allocates nothing but selects every backend, so a missing kernel or flash-attn shows.
        with torch.device("meta"):
            return Transformer(cfg.model, loss=cfg.train.loss)

    model = attempt(build_meta)
    n_params = None if model is None else count_params(model)
    warnings: list[str] = []
    resume_from = attempt(resolve_resume, cfg, warnings)
    engine = "deepspeed" if dims is not None and dims.uses_deepspeed else "dcp"
    if resume_from is not None:
        attempt(checkpoint.check_compatible, resume_from, cfg.model, engine)
        if not rank_file(resume_from, 0).is_file():
            problems.append(
                f"train.resume={str(resume_from)!r} holds model weights only (no optimizer or "
                f"trainer state); start from it with train.init_from={resume_from} instead"
            )
    elif cfg.train.init_from is not None:
        init = Path(cfg.train.init_from)
        if not init.is_dir():
            problems.append(
                f"train.init_from={cfg.train.init_from!r} is not a directory; give a checkpoint "
                "dir (a step_N dir, or the output of megalite-convert)"
            )
        else:
            attempt(checkpoint.check_compatible, init, cfg.model, "dcp")
    if n_params is not None:
        attempt(check_run_dir, Path(cfg.train.run_dir), n_params)
    attempt(check_wandb, cfg.logging.wandb.mode)
    warnings += demo_warnings(cfg)
    if problems:
        raise PreflightError(problems)
    return Plan(
        cfg,
        global_batch,
        dims,
        model,
        manifest,
        resume_from,
        n_params,
        precision_reason=precision_reason,
        warnings=warnings,
    )
