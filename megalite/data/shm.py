"""Stale mosaicml-streaming shared memory and file locks: find them and remove them safely.

Every StreamingDataset registers a prefix NNNNNN and creates `/dev/shm/NNNNNN_*` segments and
`$TMPDIR/NNNNNN_*_filelock` files. A job killed as a whole (SIGKILL to its process group, OOM,
preemption) takes Python's resource tracker with it and leaves the segments behind; the file locks
are left behind even by a clean exit. A restarted job whose local cache dir is listed in a stale
`NNNNNN_locals` then fails with "Reused local directory", and streaming's own
`clean_stale_shared_memory()` is no cure: it stops at the first free prefix and unlinks the
segments of *live* datasets of other jobs on the same machine.

Here a prefix is stale only when no live process owns it:

- megalite's datasets record their owner in `/dev/shm/megalite_NNNNNN.owner` (pid and process
  start time, so a reused pid does not count): the prefix is stale iff that process is gone;
- for prefixes without an owner file (made by other code) it is stale iff no process maps or
  holds open any of its segments (read from /proc).

`clean_stale()` removes stale prefixes' segments, owner files and the file locks in the given
temp dir. Each node's local leader calls it whenever it opens a dataset (`register_prefix`); the
test suite gives every test its own TMPDIR so file locks never collide.

Streaming picks a prefix by looking for the first free one and creates it only after a barrier
of the job's ranks, so two jobs starting at once on one machine can pick the same prefix and fail
(`FileExistsError: '/000000_locals'`), and so do two "nodes" of one job on one machine (each has
a local leader). megalite's datasets register their prefix with `register_prefix` instead: each
local leader finds and creates its prefix (and records its owner) under a host-wide `flock` that
the kernel releases if its holder dies, with no collective inside the lock; the other ranks of the
node learn the prefix from an all-gather.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streaming.base.shared import SharedMemory
    from streaming.base.world import World

SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^(\d{6})_")
_OWNER = re.compile(r"^megalite_(\d{6})\.owner$")
_FILELOCK = re.compile(r"^(\d{6})_.*_filelock$")
LOCK_FILE = SHM_DIR / "megalite.lock"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may contain spaces, so split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def owner_path(prefix: int) -> Path:
    return SHM_DIR / f"megalite_{prefix:06d}.owner"


def record_owner(prefix: int) -> None:
    """Marks `prefix` as owned by this process (call once its dataset exists)."""
    pid = os.getpid()
    path = owner_path(prefix)
    tmp = path.with_name(f".{path.name}.{pid}")
    tmp.write_text(f"{pid} {_start_time(pid)}\n")
    os.replace(tmp, path)
    atexit.register(_forget_owner, path, pid)


def _forget_owner(path: Path, pid: int) -> None:
    """At a clean exit (streaming unlinks its segments then too), if the record is still ours."""
    try:
        if os.getpid() == pid and path.read_text().split()[0] == str(pid):
            path.unlink()
    except (OSError, IndexError):
        pass


def _owner_alive(path: Path) -> bool:
    try:
        pid_text, start = path.read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_text)) == start


def _segments_in_use() -> set[str]:
    """Names of /dev/shm entries mapped or held open by any process we can inspect."""
    used: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        used.add(line[i + 9 :].split()[0])
        except OSError:
            pass
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    used.add(target[9:].split()[0])
        except OSError:
            pass
    return used


def stale_prefixes(tmpdir: str | Path | None = None) -> dict[int, list[Path]]:
    """Stale prefixes and the files that belong to them (segments, owner file, file locks in
    `tmpdir`, default the temp dir)."""
    tmpdir = Path(tmpdir or tempfile.gettempdir())
    files: dict[int, list[Path]] = defaultdict(list)
    owners: dict[int, Path] = {}
    if SHM_DIR.is_dir():
        for p in SHM_DIR.iterdir():
            if m := _SEGMENT.match(p.name):
                files[int(m.group(1))].append(p)
            elif m := _OWNER.match(p.name):
                owners[int(m.group(1))] = p
    if tmpdir.is_dir():
        for p in tmpdir.iterdir():
            if m := _FILELOCK.match(p.name):
                files[int(m.group(1))].append(p)
    in_use: set[str] | None = None
    stale = {}
    for prefix in sorted(set(files) | set(owners)):
        if prefix in owners:
            alive = _owner_alive(owners[prefix])
        else:
            if in_use is None:
                in_use = _segments_in_use()
            alive = any(p.parent == SHM_DIR and p.name in in_use for p in files[prefix])
        if not alive:
            stale[prefix] = files[prefix] + ([owners[prefix]] if prefix in owners else [])
    return stale


def clean_stale(tmpdir: str | Path | None = None) -> list[Path]:
    """Removes everything `stale_prefixes` finds; returns the removed paths."""
    removed = []
    for paths in stale_prefixes(tmpdir).values():
        for p in paths:
            try:
                p.unlink()
                removed.append(p)
            except (FileNotFoundError, PermissionError):
                pass
    return removed


@contextmanager
def registration_lock() -> Iterator[None]:
    """The host-wide lock around finding and creating a prefix."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def register_prefix(
    streams_local: list[str], streams_remote: list[str | None], world: World, retry: int = 100
) -> tuple[int, SharedMemory]:
    """Drop-in for mosaicml-streaming 0.13's `get_shm_prefix` (same arguments and result: the
    prefix and the `NNNNNN_locals` segment listing the local dirs), race-free between megalite
    jobs and between the node leaders of one job on one machine."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import (
        _check_and_find_retrying,
        _check_self,
        _get_path,
        _pack_locals,
        _unpack_locals,
    )

    _check_self(streams_local)
    prefix, segment = None, None
    if world.is_local_leader:
        with registration_lock():
            clean_stale()
            prefix = max(
                _check_and_find_retrying(streams_local, streams_remote, name, retry)
                for name in SHM_TO_CLEAN
            )
            data = _pack_locals(streams_local, prefix)
            segment = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
            segment.buf[: len(data)] = data
            record_owner(prefix)
    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (world.node, prefix))
        prefix = next(p for node, p in gathered if node == world.node and p is not None)
    if not world.is_local_leader:
        segment = SharedMemory(_get_path(prefix, LOCALS), False)
        their_locals, their_prefix = _unpack_locals(bytes(segment.buf))
        if streams_local != their_locals or prefix != their_prefix:
            raise RuntimeError(
                f"shared memory prefix {prefix} of this node lists {their_locals}, not "
                f"{streams_local}: do all ranks use the same data config?"
            )
    return prefix, segment


_PATCH = threading.Lock()


@contextmanager
def megalite_registration() -> Iterator[None]:
    """Makes StreamingDataset.__init__ (run inside this block) register with `register_prefix`."""
    import streaming.base.dataset as streaming_dataset

    with _PATCH:
        original = streaming_dataset.get_shm_prefix
        streaming_dataset.get_shm_prefix = register_prefix
        try:
            yield
        finally:
            streaming_dataset.get_shm_prefix = original


def release(dataset: object) -> int:
    """Closes (and, where this process created them, unlinks) every shared-memory segment a
    StreamingDataset holds; returns how many. Streaming registers each segment's cleanup with
    `atexit`, which keeps the segment's file descriptor open until the process exits: a process
    that opens datasets again and again (a sweep, a test session, a rollback) would run out of
    descriptors. Call it only when no rank uses the dataset any more."""
    import atexit

    from streaming.base.shared.memory import SharedMemory

    found: dict[int, SharedMemory] = {}

    def walk(obj: object, depth: int) -> None:
        if isinstance(obj, SharedMemory):
            found[id(obj)] = obj
            return
        if depth == 0 or not hasattr(obj, "__dict__"):
            return
        for value in vars(obj).values():
            if isinstance(value, dict):
                value = list(value.values())
            if isinstance(value, (list, tuple)):
                for item in value:
                    walk(item, depth - 1)
            else:
                walk(value, depth - 1)

    walk(dataset, 4)
    for shm in found.values():
        atexit.unregister(shm.cleanup)
        shm.cleanup()
    return len(found)
