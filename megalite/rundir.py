"""The layout of a run directory and of a checkpoint on disk, and a checkpoint's meta.json: the
one place these names are spelled. The trainer, checkpoint save / load, preflight, the metrics
sink, the inference tools and the converters read them from here (launch/slurm.sbatch, a shell
script, spells PREEMPTED itself).

    <run_dir>/
        config.yaml               the resolved config (config.resumed-<time>.yaml beside it when
                                  a resume changed a setting)
        metrics.jsonl             one JSON record per logged step
        summary.json, loss.png    written when the run finishes
        harness/                  harness evals beside training (eval_watch.py): step_N.json /
                                  .md per checkpoint, watch.log
        PREEMPTED                 left by a run stopped by SIGUSR1 / SIGTERM; the launcher requeues
        checkpoints/
            latest                name of the newest complete checkpoint
            step_00000400/        one checkpoint (a "checkpoint dir"):
                .metadata, __<rank>_<n>.distcp   model + optimizer, written by DCP (DeepSpeed
                                                 runs: DeepSpeed's own files instead)
                rank_00000.pt ...                per-rank trainer state: RNG, data position
                meta.json                        step, tokens, world size, engine, model config
            step_00000500.tmp/    a save in progress, renamed to step_00000500/ once complete

    <parent of run_dir>/latest    a symlink to the newest run started in that dir (`runs/latest`
                                  after `make demo`), replaced atomically by rank 0

meta.json is written last, so a checkpoint dir holding one is complete. A dir megalite-convert
writes is a checkpoint dir too: DCP files and meta.json, no rank files (weights only).

This module does no I/O beyond meta.json and listing directories, and imports nothing heavy, so
any module can read the layout from it without an import cycle.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megalite.errors import CheckpointError

if TYPE_CHECKING:
    from megalite.config import ModelConfig

META = "meta.json"
# DCP's index of the tensors in a checkpoint dir; without it no weight can be read.
DCP_INDEX = ".metadata"
CHECKPOINTS = "checkpoints"
# The names `rank_file` writes, for telling which rank wrote a file.
RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")
_STEP = re.compile(r"^step_(\d+)$")


def rank_file(ckpt: Path, rank: int) -> Path:
    """The trainer state one rank saved in a checkpoint dir."""
    return Path(ckpt) / f"rank_{rank:05d}.pt"


class RunDir:
    """The paths inside one run directory (creates nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.loss_plot = self.path / "loss.png"
        self.harness = self.path / "harness"
        # The marker a stopped run leaves for the launcher (launch/slurm.sbatch checks it).
        self.preempted = self.path / "PREEMPTED"
        self.checkpoints = self.path / CHECKPOINTS
        self.latest = self.checkpoints / "latest"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def resumed_config(self, stamp: str) -> Path:
        """Where a resumed run with other settings writes its config, beside the first one."""
        return self.path / f"config.resumed-{stamp}.yaml"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def staging(self, step: int) -> Path:
        """Where the checkpoint of `step` is written before its rename to `checkpoint(step)`."""
        return self.checkpoints / f"step_{step:08d}.tmp"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a half-written `.tmp` dir is never listed)."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            p
            for p in self.checkpoints.iterdir()
            if p.is_dir() and _STEP.match(p.name) and (p / META).is_file()
        ]
        return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))

    def newest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> RunDir | None:
        """The run dir a `checkpoints/step_N` dir belongs to, or None for any other dir (a
        megalite-convert output)."""
        ckpt = Path(ckpt)
        return cls(ckpt.parent.parent) if ckpt.parent.name == CHECKPOINTS else None


def write_meta(
    ckpt: Path,
    *,
    step: int,
    tokens: int | None,
    world_size: int,
    engine: str,
    model: ModelConfig,
    **extra: Any,
) -> Path:
    """Writes `ckpt/meta.json`, the mark of a complete checkpoint, so write it after every other
    file. `engine` is the format of the weight files ("dcp" or "deepspeed"); `extra` keys (an
    imported model's source and EOS ids, a conversion's origin) are kept as given. Returns its
    path; making it durable (fsync) is the caller's part."""
    meta = {
        "step": step,
        "tokens": tokens,
        "world_size": world_size,
        "engine": engine,
        "model": asdict(model),
        **extra,
    }
    path = Path(ckpt) / META
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(ckpt: Path, fix: str = "give a step_N checkpoint dir") -> dict[str, Any]:
    """A checkpoint dir's meta.json. A missing or unreadable one is a CheckpointError naming the
    path and `fix` (what the caller's user should pass instead)."""
    path = Path(ckpt) / META
    if not path.is_file():
        raise CheckpointError(
            f"{str(ckpt)!r} is not a complete megalite checkpoint (no {META}); {fix}"
        )
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{str(path)!r} cannot be read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    return meta


# The name of the link beside run dirs that points at the newest one started.
LATEST_RUN = "latest"


def point_latest(run_dir: str | Path) -> Path | None:
    """Makes `<parent>/latest` a symlink to `run_dir` (relative, so the tree can move), so
    commands can name the newest run without its timestamp (`megalite-eval runs/latest`).
    Replaced atomically (a link beside it, then a rename), so a reader never sees it missing.
    Never replaces a file or directory of that name that is not a symlink, and links nothing
    when the run dir is itself called `latest`. Returns the link, or None when none was made."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST_RUN
    if run_dir.name in (LATEST_RUN, "", ".", "..") or (link.exists() and not link.is_symlink()):
        return None
    tmp = link.with_name(f".{LATEST_RUN}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        # A file system without symlinks (some network mounts) only loses the shortcut.
        tmp.unlink(missing_ok=True)
        return None
    return link
