"""Which checkpoint a run resumes from: `train.resume` resolved, and each candidate's files
checked before anything is written or loaded.

A checkpoint dir with a meta.json was complete when it was written, but a disk that filled up, a
copy cut short or a file system that lost a write can still leave one of its files truncated.
Loading such a file fails deep inside torch ("PytorchStreamReader failed reading zip archive")
after the run dir has been written to; checking is cheap (file sizes against DCP's index, the
CRCs of the small per-rank zip files), so preflight does it first and names the file.
`train.resume=auto` then falls back to the newest checkpoint that passes, and says so.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from megalite import rundir
from megalite.config import Config
from megalite.errors import CheckpointError, ConfigError


def damage(ckpt: Path) -> str | None:
    """What is wrong with the files of a checkpoint dir that has a meta.json ("__0_0.distcp is
    truncated: 1,000 of 4,114 bytes"), or None when every file it needs is whole."""
    ckpt = Path(ckpt)
    try:
        meta = rundir.read_meta(ckpt)
    except CheckpointError as e:
        return f"{rundir.META}: {e}"
    problem = None
    if meta.get("engine", "dcp") == "dcp":
        problem = _dcp_damage(ckpt)
    return problem or _rank_file_damage(ckpt)


def _dcp_damage(ckpt: Path) -> str | None:
    # DCP's index records, for every tensor, the file, offset and length of its bytes: a file
    # shorter than the end of its last entry was cut short.
    from torch.distributed.checkpoint import FileSystemReader

    if not (ckpt / rundir.DCP_INDEX).is_file():
        return f"{rundir.DCP_INDEX} (the DCP index) is missing"
    try:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
        return f"{rundir.DCP_INDEX} cannot be read: {type(e).__name__}: {e}"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        have = path.stat().st_size
        if have < size:
            return f"{name} is truncated: {have:,} of {size:,} bytes"
    return None


def _rank_file_damage(ckpt: Path) -> str | None:
    # torch.save writes a zip archive with a CRC per entry; these files are small (RNG states
    # and the data position, ~10 KB), so reading them whole costs little. Every rank checks every
    # rank's file, not just its own: preflight runs before any process group exists, so the
    # ranks agree on which checkpoint to resume only by checking the same files.
    for path in sorted(ckpt.glob("rank_*.pt")):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            return f"{path.name} is not a readable torch file: {e}"
        if bad is not None:
            return f"{path.name} is damaged: entry {bad} fails its CRC"
    return None


def _previous_good(run: rundir.RunDir, before: Path) -> Path | None:
    older = [p for p in run.complete_checkpoints() if p.name < before.name]
    return next((p for p in reversed(older) if damage(p) is None), None)


def resolve_resume(cfg: Config, notes: list[str] | None = None) -> Path | None:
    """The checkpoint to start from per `train.resume`, or None for a fresh run. Refuses to
    start a fresh run in a run dir that already holds one, so nothing written before is
    overwritten; refuses a damaged checkpoint, naming it and the file, or (auto) falls back to
    the newest good one and appends a line saying so to `notes`."""
    run_dir = Path(cfg.train.run_dir)
    run = rundir.RunDir(run_dir)
    resume = cfg.train.resume
    if resume == "none":
        existing = run.newest_checkpoint()
        if existing is not None or run.metrics.exists():
            what = f"checkpoint {existing.name}" if existing else "metrics.jsonl"
            raise ConfigError(
                f"train.run_dir={str(run_dir)!r} already holds a run ({what}); pass "
                "train.resume=auto to continue it, or choose another train.run_dir"
            )
        return None
    if resume == "auto":
        damaged: list[str] = []
        for ckpt in reversed(run.complete_checkpoints()):
            problem = damage(ckpt)
            if problem is None:
                if damaged and notes is not None:
                    notes.append(
                        "; ".join(f"checkpoint {d} is damaged" for d in damaged)
                        + f"; train.resume=auto resumes from the previous good checkpoint "
                        f"{ckpt.name} instead (the steps after it run again and their "
                        "checkpoints are rewritten)"
                    )
                return ckpt
            damaged.append(f"{str(ckpt)!r} ({problem})")
        if damaged:
            raise CheckpointError(
                f"train.resume=auto: every checkpoint in {str(run.checkpoints)!r} is damaged: "
                + "; ".join(damaged)
                + "; restore one from a copy, or start over in a fresh train.run_dir"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={resume!r} is not a directory; give a step_N checkpoint dir, or auto"
        )
    if (path / rundir.META).is_file() and (problem := damage(path)) is not None:
        owner = rundir.RunDir.of_checkpoint(path)
        previous = _previous_good(owner, path) if owner is not None else None
        fix = (
            f"resume from the previous good checkpoint with train.resume={previous} "
            "(or train.resume=auto, which falls back to it)"
            if previous is not None
            else "no earlier good checkpoint exists; restore it from a copy or start a fresh run"
        )
        raise CheckpointError(
            f"train.resume={resume!r}: checkpoint {str(path)!r} is damaged ({problem}); {fix}"
        )
    return path
