"""Shards read in place: sizes and MDS headers are checked at start with a few small reads per
shard (the process group does not exist yet, so this must not read whole shards); sha1s, with
data.verify_shards=hash, are checked after it exists, each shard by one rank."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct

import pytest

from megalite.config import DataConfig, ModelConfig
from megalite.data import streams
from megalite.data.common import DataError
from megalite.data.loader import check_dataset, verify_shard_hashes
from tests.data.conftest import write_numbered

MODEL = ModelConfig(vocab_size=1 << 16, dim=64, n_heads=4)


def _all_shard_files(root) -> set[str]:
    return {str(p) for split in ("train", "val") for p in (root / split).glob("shard.*.mds")}


def _flip_byte(path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hashing_split_over_two_ranks_is_disjoint_and_finds_a_flipped_byte(tmp_path, monkeypatch):
    root = write_numbered(tmp_path / "d", n_train=40, n_val=8)
    files = _all_shard_files(root)
    assert len(files) >= 8
    bad = sorted((root / "train").glob("shard.*.mds"))[3]
    expected = hashlib.sha1(bad.read_bytes()).hexdigest()
    _flip_byte(bad, bad.stat().st_size - 3)  # inside the last sample: same size, same header
    actual = hashlib.sha1(bad.read_bytes()).hexdigest()
    cfg = DataConfig(dir=str(root), seq_len=8, verify_shards="hash")
    check_dataset(cfg, MODEL)  # sizes and headers are fine: only hashing can see this

    hashed: list[str] = []
    real_sha1 = streams.file_sha1

    def recording_sha1(path):
        hashed.append(str(path))
        return real_sha1(path)

    monkeypatch.setattr(streams, "file_sha1", recording_sha1)
    mine, problems = [], []
    for rank in (0, 1):
        hashed.clear()
        problems.append(verify_shard_hashes(cfg, rank, 2))
        mine.append(set(hashed))
        assert len(mine[rank]) == len(hashed)  # each file once
    a, b = mine
    assert a and b and not a & b and a | b == files
    assert abs(len(a) - len(b)) <= 1  # the shards are all about one size
    assert len(problems[0] + problems[1]) == 1
    assert bool(problems[0]) == (str(bad) in a)  # found by the rank that hashed it
    (msg,) = problems[0] + problems[1]
    assert str(bad) in msg and expected in msg and actual in msg and "restore it" in msg

    # One rank alone hashes everything; the default (size) and none hash nothing.
    hashed.clear()
    assert len(verify_shard_hashes(cfg, 0, 1)) == 1 and set(hashed) == files
    hashed.clear()
    assert DataConfig(dir=str(root)).verify_shards == "size"
    for mode in ("size", "none"):
        cfg = DataConfig(dir=str(root), seq_len=8, verify_shards=mode)
        assert verify_shard_hashes(cfg, 0, 1) == []
    assert hashed == []


def test_split_by_bytes_balances_shards_of_mixed_sizes(tmp_path):
    # Alternating large and small shards: rank = i % 2 would give rank 0 every large one.
    shards = [
        streams.ShardFiles(None, tmp_path, {"raw_data": {"basename": f"s{i}", "bytes": size}})
        for i, size in enumerate([1000, 10] * 8)
    ]
    parts = streams.split_by_bytes(shards, 2)
    loads = [sum(s.bytes for s in part) for part in parts]
    assert sorted(loads) == [4040, 4040]
    names = [s.entry["raw_data"]["basename"] for part in parts for s in part]
    assert sorted(names) == sorted(f"s{i}" for i in range(16))
    # Every rank derives the same split, whatever order it listed the shards in.
    again = streams.split_by_bytes(shards[::-1], 2)
    assert [[id(s) for s in p] for p in again] == [[id(s) for s in p] for p in parts]


class _CountingFile(io.RawIOBase):
    """A file whose reads are counted, to show how much of a shard a check reads."""

    def __init__(self, f, counter: dict, path: str) -> None:
        self.f, self.counter, self.path = f, counter, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.counter[self.path] = self.counter.get(self.path, 0) + n
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.fixture
def big_shard(tmp_path, monkeypatch):
    """A dataset whose train split is one ~2 MB shard, the bytes read from each file through
    streams.py, and hashing made to fail: the start-up check must do neither."""
    root = write_numbered(tmp_path / "big", n_train=2048, seq_len=511, shard_bytes=1 << 22)
    (shard,) = (root / "train").glob("shard.*.mds")
    assert shard.stat().st_size > 2_000_000
    read: dict[str, int] = {}

    def counting_open(path, mode="r", *args, **kwargs):
        assert mode == "rb"
        return io.BufferedReader(_CountingFile(open(path, mode, buffering=0), read, str(path)))

    def no_hashing(path):
        raise AssertionError(f"the start-up check hashed {path}")

    monkeypatch.setattr(streams, "open", counting_open, raising=False)
    monkeypatch.setattr(streams, "file_sha1", no_hashing)
    return root, shard, read


def _cfg(root, mode="hash") -> DataConfig:
    return DataConfig(dir=str(root), seq_len=511, verify_shards=mode)


def test_start_check_reads_only_the_header_of_an_intact_shard(big_shard):
    root, shard, read = big_shard
    check_dataset(_cfg(root), MODEL)
    # The header was read (so a bad one would be seen), and little else: two small reads.
    assert 0 < read[str(shard)] <= 16 * 1024


def test_bad_headers_are_caught_at_start_without_hashing(big_shard):
    root, shard, read = big_shard
    size = shard.stat().st_size
    original = shard.read_bytes()
    (n,) = struct.unpack("<I", original[:4])

    # A sample count that disagrees with index.json (same size, one field changed).
    shard.write_bytes(struct.pack("<I", n - 1) + original[4:])
    with pytest.raises(
        DataError,
        match=rf"shard '{re.escape(str(shard))}' has a bad MDS header \(it counts {n - 1} "
        rf"samples, index.json {n}\): .*re-run megalite-data prepare",
    ):
        check_dataset(_cfg(root), MODEL)

    # A shard from another dataset: same length, other column encoding in its config.
    start = original.index(b'"column_encodings"')
    swapped = original[:start] + original[start:].replace(b"uint16", b"uint32", 1)
    assert len(swapped) == size
    shard.write_bytes(swapped)
    with pytest.raises(DataError, match=r"bad MDS header \(column_encodings=\['ndarray:uint32"):
        check_dataset(_cfg(root, "size"), MODEL)

    # An offset table that does not end at the file's end.
    last = 4 + 4 * n
    shard.write_bytes(original[:last] + struct.pack("<I", size - 1) + original[last + 4 :])
    with pytest.raises(DataError, match=rf"its last sample ends at byte {size - 1}, not at its"):
        check_dataset(_cfg(root), MODEL)
    assert 0 < read[str(shard)] <= 3 * 16 * 1024  # three checks, each a header's worth

    # Truncated: the size says so before any read of the shard.
    read.clear()
    shard.write_bytes(original[:-100])
    with pytest.raises(DataError, match=rf"has {size - 100} bytes but index.json says {size}"):
        check_dataset(_cfg(root), MODEL)
    assert str(shard) not in read

    shard.write_bytes(original[:-100])
    check_dataset(_cfg(root, "none"), MODEL)  # none checks nothing


def test_stats_verify_hashes_every_shard_in_one_process(tmp_path):
    root = write_numbered(tmp_path / "d", n_train=20)
    bad = sorted((root / "train").glob("shard.*.mds"))[1]
    _flip_byte(bad, bad.stat().st_size - 3)
    assert streams.check_shards(root / "train") == len(_all_shard_files(root))
    with pytest.raises(DataError, match=rf"shard '{re.escape(str(bad))}' fails its sha1 check"):
        streams.verify_shards(root / "train", hashes=True)
    index = json.loads((root / "train" / "index.json").read_text())
    assert all(s["raw_data"]["hashes"]["sha1"] for s in index["shards"])
