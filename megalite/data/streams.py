"""Where the training data lives: `data.dir` or `data.streams` resolved to (remote, local) pairs,
their manifests fetched and checked, and shards verified before any training work starts.

A stream's remote and local both name a dataset root (manifest.json, tokenizer.json, train/,
val/). With a remote, the manifest, the tokenizer and each split's index.json are downloaded into
`local` here (small files), and mosaicml-streaming downloads the shards as they are needed,
checking each one's sha1. Without a remote, the shards are read in place and checked here, since
nothing downloads them (`data.verify_shards`): sizes and headers at start-up, before the process
group exists (a few hundred bytes per shard); sha1s, when asked, after it exists, each shard
hashed once by one rank (`split_by_bytes`), so hours of hashing never hold up the rendezvous.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import struct
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


# ------------------------------------------------------------------------- shards read in place
# A shard's header is read in two small reads: its first 8 bytes (sample count, first offset),
# then its last offset and the column config behind the offset table. The config is the writer's
# JSON (a few hundred bytes); a "config" larger than this is a corrupt first offset.
_MAX_CONFIG_BYTES = 1 << 16


@dataclass
class ShardFiles:
    """One shard of index.json: its files (raw, compressed, or both) with expected sizes and
    sha1s. The unit the hashing is split by, so the split depends on index.json alone."""

    key: str | None  # the config key, for messages
    split_dir: Path
    entry: dict  # the shard's index.json entry

    @property
    def infos(self) -> list[dict]:
        return [i for i in (self.entry.get("raw_data"), self.entry.get("zip_data")) if i]

    @property
    def bytes(self) -> int:
        return max(i["bytes"] for i in self.infos)

    def where(self) -> str:
        return f"{self.key}: " if self.key else ""


def index_shards(split_dir: Path, key: str | None = None) -> list[ShardFiles]:
    index = json.loads((split_dir / INDEX).read_text())
    return [ShardFiles(key, split_dir, entry) for entry in index["shards"]]


def check_shards(split_dir: Path, key: str | None = None) -> int:
    """The start-up check of shards read in place: every shard listed in index.json is present,
    has the size index.json gives, and an uncompressed MDS shard's header agrees with its entry
    (sample count, first and last offset, columns). A few hundred bytes read per shard, however
    large it is: contents are only checked by hashing (`hash_problems`). Returns the number of
    files checked. Compressed shards may be present raw, compressed or both; a compressed
    file's header is inside its compressed stream, so only its size is checked."""
    checked = 0
    for shard in index_shards(split_dir, key):
        present = [i for i in shard.infos if (split_dir / i["basename"]).is_file()]
        if not present:
            raise DataError(
                f"{shard.where()}shard {str(split_dir / shard.infos[-1]['basename'])!r} listed "
                f"in {INDEX} is missing; restore it, or re-run megalite-data prepare"
            )
        for info in present:
            path = split_dir / info["basename"]
            size = path.stat().st_size
            if size != info["bytes"]:
                raise DataError(
                    f"{shard.where()}shard {str(path)!r} has {size} bytes but {INDEX} says "
                    f"{info['bytes']}: it is truncated or corrupted; restore it, or re-run "
                    "megalite-data prepare"
                )
            if info is shard.entry.get("raw_data") and shard.entry.get("format") == "mds":
                _check_mds_header(path, shard)
            checked += 1
    return checked


def _check_mds_header(path: Path, shard: ShardFiles) -> None:
    """An MDS shard is `uint32 n | uint32 offsets[n + 1] | config JSON | samples`, offsets
    counted from the file's start: offsets[0] is the header's length, offsets[n] the file's."""
    entry = shard.entry
    size = entry["raw_data"]["bytes"]

    def bad(detail: str) -> DataError:
        return DataError(
            f"{shard.where()}shard {str(path)!r} has a bad MDS header ({detail}): it is "
            "corrupted or belongs to another dataset; restore it, or re-run megalite-data prepare"
        )

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{len(head)} bytes, shorter than any header")
        n, first = struct.unpack("<II", head)
        if n != entry["samples"]:
            raise bad(f"it counts {n} samples, {INDEX} {entry['samples']}")
        table_end = 4 + 4 * (n + 1)
        if not table_end <= first <= min(size, table_end + _MAX_CONFIG_BYTES):
            raise bad(f"its first sample starts at byte {first}, outside its header")
        f.seek(4 + 4 * n)
        tail = f.read(4 + first - table_end)
    (last,) = struct.unpack("<I", tail[:4])
    if last != size:
        raise bad(f"its last sample ends at byte {last}, not at its end, byte {size}")
    try:
        config = json.loads(tail[4:])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise bad("its column config is not a JSON object")
    for k in ("format", "column_names", "column_encodings", "column_sizes"):
        if config.get(k) != entry.get(k):
            raise bad(f"{k}={config.get(k)!r} where {INDEX} has {entry.get(k)!r}")


def file_sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def split_by_bytes(shards: list[ShardFiles], world_size: int) -> list[list[ShardFiles]]:
    """Deals shards to `world_size` ranks, largest first to the least-loaded rank: every rank
    derives the same split from the same index files, and the largest load is within 4/3 of the
    best possible one even when streams have shards of different sizes (plain i % world_size can
    give one rank all the large ones), so no rank waits long for the slowest."""
    heap = [(0, r) for r in range(world_size)]
    parts: list[list[ShardFiles]] = [[] for _ in range(world_size)]
    order = sorted(shards, key=lambda s: (-s.bytes, str(s.split_dir), s.infos[0]["basename"]))
    for shard in order:
        load, r = heapq.heappop(heap)
        parts[r].append(shard)
        heapq.heappush(heap, (load + shard.bytes, r))
    return parts


def hash_problems(shards: list[ShardFiles]) -> list[str]:
    """sha1s every present file of `shards` against index.json (files written without a sha1
    are skipped); returns one message per bad file."""
    problems = []
    for shard in shards:
        present = [i for i in shard.infos if (shard.split_dir / i["basename"]).is_file()]
        if not present:
            problems.append(
                f"{shard.where()}shard "
                f"{str(shard.split_dir / shard.infos[-1]['basename'])!r} listed in {INDEX} is "
                "missing; restore it, or re-run megalite-data prepare"
            )
        for info in present:
            expected = (info.get("hashes") or {}).get("sha1")
            if not expected:
                continue
            path = shard.split_dir / info["basename"]
            try:
                got = file_sha1(path)
            except OSError as e:
                problems.append(
                    f"{shard.where()}shard {str(path)!r} cannot be read ({e}); restore it, or "
                    "re-run megalite-data prepare"
                )
                continue
            if got != expected:
                problems.append(
                    f"{shard.where()}shard {str(path)!r} fails its sha1 check ({INDEX}: "
                    f"{expected}, file: {got}): it is corrupted; restore it from the prepared "
                    "dataset, or re-run megalite-data prepare"
                )
    return problems


def verify_shards(split_dir: Path, hashes: bool, key: str | None = None) -> int:
    """`check_shards`, then (if `hashes`) every shard's sha1 in this process: for
    `megalite-data stats --verify`. Raises one DataError listing every bad file."""
    checked = check_shards(split_dir, key)
    if hashes:
        problems = hash_problems(index_shards(split_dir, key))
        if problems:
            raise DataError("\n".join(problems))
    return checked
