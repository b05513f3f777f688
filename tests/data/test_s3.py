"""Object storage for real: datasets uploaded with boto3 to a local S3-compatible server (moto on
127.0.0.1) and streamed through `remote=s3://...`, with hash checks, a bounded cache and clear
errors for incomplete uploads and stale caches."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch

from megalite.config import DataConfig, ModelConfig, StreamConfig
from megalite.data.common import DataError
from megalite.data.loader import TrainStream, ValSet, check_dataset
from tests.data.conftest import s3_client, sample_ids, upload_dir, write_numbered

MODEL = ModelConfig(vocab_size=512, dim=64, n_heads=4)


def s3_config(url: str, cache, **kw) -> DataConfig:
    return DataConfig(
        dir=None,
        seq_len=kw.pop("seq_len", 32),
        streams=[StreamConfig(remote=url, local=str(cache))],
        **kw,
    )


def first_batches(cfg: DataConfig, n: int) -> list[torch.Tensor]:
    stream = TrainStream(cfg, micro_batch_size=4, seed=11)
    batches = [next(stream)[0] for _ in range(n)]
    stream.close()
    gc.collect()
    return batches


def test_s3_stream_matches_the_local_dataset(s3_server, tiny_data, tmp_path):
    url = upload_dir(tiny_data, "tiny", "datasets/tiny")
    cfg = s3_config(url, tmp_path / "cache")
    manifest = check_dataset(cfg, MODEL)
    assert manifest == json.loads((tiny_data / "manifest.json").read_text())
    local = DataConfig(dir=str(tiny_data), seq_len=32)
    for x, y in zip(first_batches(cfg, 3), first_batches(local, 3)):
        assert torch.equal(x, y)
    val_s3, val_local = ValSet(cfg, 0, 1), ValSet(local, 0, 1)
    for (x, _), (y, _) in zip(val_s3.batches(4, 2), val_local.batches(4, 2), strict=True):
        assert torch.equal(x, y)
    val_s3.close()
    val_local.close()


def test_corrupted_remote_shard_is_a_clear_error(s3_server, tiny_data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    shard = sorted((bad / "train").glob("shard.*.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = s3_config(upload_dir(bad, "corrupt", "ds"), tmp_path / "cache")
    check_dataset(cfg, MODEL)  # the manifest and indexes are fine; the shard is not
    stream = TrainStream(cfg, micro_batch_size=4, seed=0)
    with pytest.raises(DataError, match=r"shard train/shard.00000.mds from s3://corrupt/ds/train "
                       r"could not be used \(ValueError: Checksum failure"):  # fmt: skip
        for _ in range(10):
            next(stream)
    stream.close()


def test_incomplete_upload_and_stale_cache_are_refused(s3_server, tiny_data, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_data, partial)
    (partial / "train" / "index.json").unlink()
    cfg = s3_config(upload_dir(partial, "partial", "ds"), tmp_path / "cache-a")
    with pytest.raises(DataError, match=r"cannot read s3://partial/ds/train/index.json"):
        check_dataset(cfg, MODEL)
    with pytest.raises(DataError, match=r"cannot read s3://nowhere/ds/manifest.json"):
        check_dataset(s3_config("s3://nowhere/ds", tmp_path / "cache-b"), MODEL)
    # A cache filled from one dataset, then pointed at another one.
    cache = tmp_path / "cache-c"
    check_dataset(s3_config(upload_dir(tiny_data, "first", "ds"), cache), MODEL)
    other = write_numbered(tmp_path / "numbered", 20, n_val=4, seq_len=32)
    shutil.copy(tiny_data / "tokenizer.json", other / "tokenizer.json")
    m = json.loads((other / "manifest.json").read_text())
    m.update(tokenizer_sha256=json.loads((tiny_data / "manifest.json").read_text())[
        "tokenizer_sha256"], vocab_size=512)  # fmt: skip
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"the cache '.*cache-c/train' holds another version"):
        check_dataset(s3_config(upload_dir(other, "second", "ds"), cache), MODEL)


def cache_bytes(root) -> int:
    total = 0
    for p in root.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # evicted while we looked
            pass
    return total


def test_cache_limit_evicts_and_the_epoch_is_still_exact(s3_server, tmp_path):
    data = write_numbered(tmp_path / "numbered", 200)
    index = json.loads((data / "train" / "index.json").read_text())
    shard_bytes = max(s["raw_data"]["bytes"] for s in index["shards"])
    limit = (data / "train" / "index.json").stat().st_size + 5 * shard_bytes
    cache = tmp_path / "cache"
    cfg = s3_config(
        upload_dir(data, "numbered", "ds"), cache, seq_len=8, cache_limit=str(limit), predownload=4
    )
    stream = TrainStream(cfg, micro_batch_size=4, seed=2)
    seen, peak = [], 0
    for _ in range(200 // 4):
        seen += sample_ids(next(stream)[0])
        peak = max(peak, cache_bytes(cache / "train"))
    stream.close()
    assert sorted(seen) == list(range(200))
    assert peak <= limit
    assert len(list((cache / "train").glob("shard.*.mds"))) < len(index["shards"])
    assert len(s3_client().list_objects_v2(Bucket="numbered")["Contents"]) > 20  # many shards
