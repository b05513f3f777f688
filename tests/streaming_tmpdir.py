"""The per-test TMPDIR that tests running mosaicml-streaming use: import `private_tmpdir` into a
directory's conftest.py and it applies to every test there."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """Each test (and every process it starts) gets its own TMPDIR, so streaming's file locks of
    one test never meet another's; stale streaming shared memory, for example left by killed
    workers, is removed afterwards (never a live job's: see megalite/data/shm.py)."""
    from megalite.data import shm

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    shm.clean_stale(tmp)
