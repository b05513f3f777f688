"""The training stream resumes exactly; the dataset is checked against the model first."""

from __future__ import annotations

import gc
import json
import re
import shutil

import pytest
import torch

from megalite.config import DataConfig, ModelConfig
from megalite.data.loader import TrainStream, ValSet, check_dataset, verify_shard_hashes
from megalite.data.prepare import DataError


def test_stream_resumes_with_the_very_next_batch(tiny_data):
    cfg = DataConfig(dir=str(tiny_data), seq_len=32)
    stream = TrainStream(cfg, micro_batch_size=4, seed=7)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(4)]
    stream.close()
    gc.collect()
    resumed = TrainStream(cfg, micro_batch_size=4, seed=7)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are inputs shifted by one


def test_val_batches_are_identical_every_time(tiny_data):
    val = ValSet(DataConfig(dir=str(tiny_data), seq_len=32), rank=0, world_size=1)
    a, b = list(val.batches(4, 3)), list(val.batches(4, 3))
    assert len(a) == 3
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    val.close()


def test_check_dataset_errors(tiny_data, tmp_path):
    model = ModelConfig(vocab_size=512, dim=64, n_heads=4)
    with pytest.raises(
        DataError,
        match=r"data.dir='/nope' does not exist; prepare it first: `megalite-data prepare",
    ):
        check_dataset(DataConfig(dir="/nope"), model)
    with pytest.raises(
        DataError, match=r"data.seq_len=64 but the shards .* seq_len=32; set data.seq_len=32"
    ):
        check_dataset(DataConfig(dir=str(tiny_data), seq_len=64), model)
    with pytest.raises(DataError, match=r"has 512 tokens but model.vocab_size=256"):
        check_dataset(
            DataConfig(dir=str(tiny_data), seq_len=32),
            ModelConfig(vocab_size=256, dim=64, n_heads=4),
        )
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_data, tampered)
    tok = json.loads((tampered / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (tampered / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="does not match the tokenizer_sha256"):
        check_dataset(DataConfig(dir=str(tampered), seq_len=32), model)


# ------------------------------------------------------------------------ checks before work
def _config(data_dir, **kw) -> DataConfig:
    return DataConfig(dir=str(data_dir), seq_len=32, **kw)


MODEL = ModelConfig(vocab_size=512, dim=64, n_heads=4)


def test_damaged_shards_and_missing_index_are_found_before_training(tiny_data, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_data, damaged)
    shard = sorted((damaged / "train").glob("shard.*.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    # Start-up checks sizes and headers only; the sha1s are checked once the ranks are up.
    check_dataset(_config(damaged, verify_shards="hash"), MODEL)
    (problem,) = verify_shard_hashes(_config(damaged, verify_shards="hash"), 0, 1)
    assert re.search(r"shard '.*shard.00000.mds' fails its sha1 check", problem)
    check_dataset(_config(damaged, verify_shards="size"), MODEL)  # a size check cannot see it
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=r"has \d+ bytes but index.json says \d+: it is truncated"):
        check_dataset(_config(damaged, verify_shards="size"), MODEL)
    (damaged / "val" / "index.json").unlink()
    with pytest.raises(DataError, match=r"data.dir='.*damaged' has no val/index.json; re-run"):
        check_dataset(_config(damaged, verify_shards="none"), MODEL)


def test_streams_must_share_one_tokenizer_and_match_a_pin(tiny_data, tmp_path, paragraphs):
    from megalite.config import StreamConfig
    from megalite.data.prepare import PrepareOptions, prepare
    from tests.data.test_readers_filters import write_jsonl

    other = tmp_path / "other"
    corpus = write_jsonl(tmp_path / "c.jsonl", paragraphs[:60])
    prepare(PrepareOptions(inputs=[str(corpus)], out=str(other), seq_len=32, vocab_size=300))
    mixed = DataConfig(
        dir=None,
        seq_len=32,
        streams=[StreamConfig(local=str(tiny_data)), StreamConfig(local=str(other))],
    )
    with pytest.raises(
        DataError, match=r"data.streams\[1\] .* another tokenizer than data.streams\[0\]"
    ):
        check_dataset(mixed, MODEL)
    with pytest.raises(
        DataError,
        match=r"tokenizer_sha256=[0-9a-f]{64} but data.tokenizer_sha256=0000; .*--tokenizer",
    ):
        check_dataset(_config(tiny_data, tokenizer_sha256="0000"), MODEL)


def test_resuming_on_other_data_is_refused(tiny_data, tmp_path):
    from tests.data.conftest import write_numbered

    stream = TrainStream(_config(tiny_data), micro_batch_size=4, seed=1)
    next(stream)
    state = stream.state_dict()
    stream.close()
    gc.collect()
    other = write_numbered(tmp_path / "numbered", 40, seq_len=32)
    stream = TrainStream(_config(other, verify_shards="none"), micro_batch_size=4, seed=1)
    with pytest.raises(DataError, match=r"data position is for other training data .*index_sha256"):
        stream.load_state_dict(state)
    stream.close()


# --------------------------------------------------------------------------------- mixtures
def test_mixture_proportions_and_validation_over_all_streams(tmp_path):
    from megalite.config import StreamConfig
    from tests.data.conftest import sample_ids, write_numbered

    a = write_numbered(tmp_path / "a", 40, n_val=12)
    b = write_numbered(tmp_path / "b", 40, n_val=12, start=1000)
    cfg = DataConfig(
        dir=None,
        seq_len=8,
        epoch_size=80,
        verify_shards="none",
        streams=[
            StreamConfig(local=str(a), proportion=3.0),
            StreamConfig(local=str(b), proportion=1.0),
        ],
    )
    stream = TrainStream(cfg, micro_batch_size=4, seed=3)
    epoch = [i for _ in range(80 // 4) for i in sample_ids(next(stream)[0])]
    stream.close()
    from_a = [i for i in epoch if i < 1000]
    from_b = [i for i in epoch if i >= 1000]
    # 3:1 of an 80-sample epoch: stream a (40 samples) is upsampled to 60, b downsampled to 20.
    assert len(from_a) == 60 and len(from_b) == 20
    assert set(from_a) == set(range(40)) and len(set(from_b)) == 20
    val = ValSet(cfg, rank=0, world_size=1)
    ids = [i for x, _ in val.batches(2, 3) for i in sample_ids(x)]
    val.close()
    assert len(val_ids := set(ids)) == 6  # spread over both streams' 24 held-out samples
    assert {i for i in val_ids if i < 1000} <= set(range(40, 52))
    assert {i for i in val_ids if i >= 1000} <= set(range(1040, 1052))
    assert min(val_ids) < 1000 <= max(val_ids)


def test_local_path_as_remote_streams_through_a_cache(tiny_data, tmp_path):
    from megalite.config import StreamConfig

    cache = tmp_path / "cache"
    cfg = DataConfig(
        dir=None, seq_len=32, streams=[StreamConfig(remote=str(tiny_data), local=str(cache))]
    )
    manifest = check_dataset(cfg, MODEL)
    assert (
        manifest["tokenizer_sha256"]
        == json.loads((tiny_data / "manifest.json").read_text())["tokenizer_sha256"]
    )
    assert (cache / "train" / "index.json").is_file() and (cache / "tokenizer.json").is_file()
    batches = {}
    for name, c in (("cached", cfg), ("in place", _config(tiny_data))):
        stream = TrainStream(c, micro_batch_size=4, seed=5)
        batches[name] = [next(stream)[0] for _ in range(3)]
        stream.close()
        gc.collect()
    assert all(torch.equal(x, y) for x, y in zip(batches["cached"], batches["in place"]))
    assert list((cache / "train").glob("shard.*.mds"))  # shards were copied in as read
