"""A job killed as a whole leaves mosaicml-streaming shared memory and file locks behind; the
restarted job cleans exactly those, and never touches a live job's (megalite's or not)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile

from megalite.config import DataConfig, StreamConfig
from megalite.data import shm
from megalite.data.loader import TrainStream
from tests.conftest import PYTHON, REPO
from tests.data.conftest import sample_ids, write_numbered

# A training job: opens a TrainStream, reads a batch, prints its shared-memory prefix, waits for a
# line on stdin, reads another batch.
JOB = """
import sys
from megalite.config import DataConfig, StreamConfig
from megalite.data.loader import TrainStream
cfg = DataConfig(dir=None, seq_len=8, streams=[StreamConfig(remote=sys.argv[1], local=sys.argv[2])])
stream = TrainStream(cfg, 2, 0)
next(stream)
print(stream.dataset._shm_prefix_int, flush=True)
sys.stdin.readline()
next(stream)
print("ok", flush=True)
"""


def start_job(remote, local, tmpdir) -> subprocess.Popen:
    """In its own session, so it can be killed as a whole, like a job."""
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [PYTHON, "-c", JOB, str(remote), str(local)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


# Another job's live segment that has no megalite owner file (say, plain mosaicml-streaming):
# it is alive because a live process maps it.
OTHER = """
import sys
from multiprocessing import shared_memory
segment = shared_memory.SharedMemory(sys.argv[1], create=True, size=64)
print("up", flush=True)
sys.stdin.readline()
segment.close()
segment.unlink()
"""


def segments(prefix: int) -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{prefix:06d}_*")}


def test_killed_job_is_cleaned_up_and_live_jobs_left_alone(tmp_path, private_tmpdir, monkeypatch):
    data = write_numbered(tmp_path / "numbered", 40)
    cache = tmp_path / "cache"
    killed = start_job(data, cache, private_tmpdir)
    other_name = f"{999_000 + os.getpid() % 1000:06d}_locals"  # far above any prefix in use
    other = subprocess.Popen(
        [PYTHON, "-c", OTHER, other_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        killed_prefix = int(killed.stdout.readline())
        assert other.stdout.readline().strip() == "up"
        os.killpg(killed.pid, signal.SIGKILL)  # the job and its resource tracker
        killed.wait()
        left = segments(killed_prefix)
        assert f"{killed_prefix:06d}_locals" in left
        assert list(private_tmpdir.glob(f"{killed_prefix:06d}_*_filelock"))

        # The stale registration lists the job's cache dir: plain mosaicml-streaming refuses to
        # reuse it ("Reused local directory") when it scans up to that prefix.
        stale_locals = (shm.SHM_DIR / f"{killed_prefix:06d}_locals").read_bytes()
        assert str(cache / "train").encode() in stale_locals
        # The job is restarted with a new TMPDIR (as a requeued batch job gets).
        restart_tmp = tmp_path / "restart-tmp"
        restart_tmp.mkdir()
        monkeypatch.setenv("TMPDIR", str(restart_tmp))
        monkeypatch.setattr(tempfile, "tempdir", str(restart_tmp))

        # Another megalite job on this machine may clean them first: check the outcome.
        killed_owner = shm.owner_path(killed_prefix).read_text()
        shm.clean_stale()
        assert killed_prefix not in shm.stale_prefixes()
        owner = shm.owner_path(killed_prefix)
        assert not owner.exists() or owner.read_text() != killed_owner  # or a new live owner
        assert (shm.SHM_DIR / other_name).exists()  # mapped by a live process
        # The old temp dir's file locks go too when it is cleaned (a job that keeps its TMPDIR).
        shm.clean_stale(private_tmpdir)
        assert not list(private_tmpdir.glob(f"{killed_prefix:06d}_*_filelock"))

        cfg = DataConfig(
            dir=None, seq_len=8, streams=[StreamConfig(remote=str(data), local=str(cache))]
        )
        restarted = TrainStream(cfg, micro_batch_size=2, seed=0)
        assert len(sample_ids(next(restarted)[0])) == 2
        mine = restarted.dataset._shm_prefix_int
        mine_segments = segments(mine)
        assert not set(shm.stale_prefixes()) & {mine, int(other_name[:6])}
        shm.clean_stale()
        assert segments(mine) == mine_segments and shm.owner_path(mine).is_file()
        assert len(sample_ids(next(restarted)[0])) == 2
        restarted.close()
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
        other.communicate("\n", timeout=60)
    assert not (shm.SHM_DIR / other_name).exists()
