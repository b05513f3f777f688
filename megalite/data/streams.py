"""Where the training data lives: `data.dir` or `data.streams` resolved to (remote, local) pairs,
their manifests fetched and checked, and shards verified before any training work starts.

A stream's remote and local both name a dataset root (manifest.json, tokenizer.json, train/,
val/). With a remote, the manifest, the tokenizer and each split's index.json are downloaded into
`local` here (small files), and mosaicml-streaming downloads the shards as they are needed,
checking each one's sha1. Without a remote, the shards are read in place and checked here, by
size or sha1 (`data.verify_shards`), since nothing downloads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megalite.config import DataConfig
from megalite.data.common import INDEX, MANIFEST, TOKENIZER, DataError, file_sha256, read_manifest


@dataclass
class Source:
    """One resolved stream."""

    key: str  # the config key, for messages
    name: str
    remote: str | None  # dataset root; an absolute path when the remote is local
    local: str  # dataset root (no remote) or its cache
    proportion: float | None

    def remote_path(self, *parts: str) -> str:
        assert self.remote is not None
        if "://" in self.remote:
            return "/".join([self.remote.rstrip("/"), *parts])
        return os.path.join(self.remote, *parts)


def resolve(cfg: DataConfig) -> list[Source]:
    if not cfg.streams:
        assert cfg.dir
        return [Source(f"data.dir={cfg.dir!r}", Path(cfg.dir).name, None, cfg.dir, None)]
    sources = []
    for i, s in enumerate(cfg.streams):
        remote = s.remote
        if remote and "://" not in remote:
            remote = str(Path(remote).resolve())
        name = s.name or Path((remote or s.local or "").rstrip("/")).name or f"stream{i}"
        local = s.local
        if local is None:
            assert remote is not None
            tag = hashlib.sha1(remote.encode()).hexdigest()[:8]
            local = str(Path(cfg.cache_dir) / f"{name}-{tag}")
        what = f"remote={s.remote!r}" if s.remote else f"local={s.local!r}"
        sources.append(Source(f"data.streams[{i}] ({what})", name, remote, local, s.proportion))
    return sources


def _download(remote_file: str, local_file: Path, timeout: float) -> None:
    """Downloads one file atomically (several ranks may fetch the same one)."""
    from streaming.base.storage import CloudDownloader

    local_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_file.with_name(f".{local_file.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    downloader = CloudDownloader.get(remote_file)
    try:
        downloader.download(remote_file, str(tmp), timeout)
    finally:
        downloader.clean_up()
    os.replace(tmp, local_file)


def _fetch(source: Source, remote_file: str, local_file: Path, timeout: float) -> None:
    try:
        _download(remote_file, local_file, timeout)
    except Exception as e:  # botocore, google, local copy errors: all mean "cannot read it"
        raise DataError(
            f"{source.key}: cannot read {remote_file} ({type(e).__name__}: {e}); is the remote "
            "a dataset made by `megalite-data prepare` and uploaded whole, and are the "
            "credentials / endpoint (S3_ENDPOINT_URL) set?"
        ) from e


def fetch_manifest(source: Source, timeout: float, prepare_hint: str) -> dict:
    """The stream's manifest; with a remote, also downloads manifest.json and tokenizer.json
    into `local`."""
    root = Path(source.local)
    if source.remote is None:
        if not root.is_dir():
            raise DataError(f"{source.key} does not exist; prepare it first: `{prepare_hint}`")
        return read_manifest(root)
    for name in (MANIFEST, TOKENIZER):
        _fetch(source, source.remote_path(name), root / name, timeout)
    return read_manifest(root)


def check_index(source: Source, split: str, manifest: dict, timeout: float, hint: str) -> None:
    """Makes sure `local/<split>/index.json` is there and belongs to this dataset: with a
    remote, a cache holding another version of the dataset is refused."""
    local_index = Path(source.local) / split / INDEX
    expected = (manifest.get("index_sha256") or {}).get(split)
    if source.remote is None:
        if not local_index.is_file():
            raise DataError(f"{source.key} has no {split}/{INDEX}; re-run `{hint}`")
        return
    fresh = local_index.with_name(f".{INDEX}.remote.{os.getpid()}")  # ranks fetch it at once
    _fetch(source, source.remote_path(split, INDEX), fresh, timeout)
    digest = file_sha256(fresh)
    if expected is not None and digest != expected:
        fresh.unlink()
        raise DataError(
            f"{source.key}: {source.remote_path(split, INDEX)} does not match the index_sha256 "
            "of its manifest.json: the upload is incomplete or mixes two datasets; upload the "
            "prepared dataset dir again, whole"
        )
    if local_index.is_file() and file_sha256(local_index) != digest:
        fresh.unlink()
        raise DataError(
            f"{source.key}: the cache {str(local_index.parent)!r} holds another version of the "
            f"dataset (its {INDEX} differs from the remote's); delete {source.local!r} or give "
            "the stream another local dir"
        )
    os.replace(fresh, local_index)


def verify_shards(split_dir: Path, hashes: bool, key: str | None = None) -> int:
    """Checks every shard file present in `split_dir` against index.json (size, and sha1 if
    `hashes`); returns the number of files checked. Compressed shards may be present raw,
    compressed or both."""
    index = json.loads((split_dir / INDEX).read_text())
    where = f"{key}: " if key else ""
    checked = 0
    for shard in index["shards"]:
        parts = [p for p in (shard.get("raw_data"), shard.get("zip_data")) if p]
        present = [p for p in parts if (split_dir / p["basename"]).is_file()]
        if not present:
            raise DataError(
                f"{where}shard {str(split_dir / parts[-1]['basename'])!r} listed in {INDEX} is "
                "missing; restore it, or re-run megalite-data prepare"
            )
        for info in present:
            path = split_dir / info["basename"]
            size = path.stat().st_size
            if size != info["bytes"]:
                raise DataError(
                    f"{where}shard {str(path)!r} has {size} bytes but {INDEX} says "
                    f"{info['bytes']}: it is truncated or corrupted; restore it, or re-run "
                    "megalite-data prepare"
                )
            expected = (info.get("hashes") or {}).get("sha1")
            if hashes and expected:
                got = hashlib.sha1(path.read_bytes()).hexdigest()
                if got != expected:
                    raise DataError(
                        f"{where}shard {str(path)!r} fails its sha1 check ({INDEX}: "
                        f"{expected[:12]}..., file: {got[:12]}...): it is corrupted; restore "
                        "it, or re-run megalite-data prepare"
                    )
            checked += 1
    return checked
