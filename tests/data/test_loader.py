"""The training stream resumes exactly; the dataset is checked against the model first."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch

from megalite.config import DataConfig, ModelConfig
from megalite.data.loader import TrainStream, ValSet, check_dataset
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
