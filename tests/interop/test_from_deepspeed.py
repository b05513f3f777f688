"""`megalite-convert from-deepspeed`: its refusals are one-line errors, and a DeepSpeed
checkpoint refused by a DCP load names this command. The conversion itself (a zero3 run's
checkpoint -> the same validation loss in one process) is tested in
tests/parallel/test_parity.py, where the DeepSpeed runs are."""

from __future__ import annotations

import pytest

from megalite.checkpoint import CheckpointError, load_for_inference
from megalite.config import ModelConfig
from megalite.interop.cli import main
from megalite.rundir import read_meta, write_meta
from tests.interop.helpers import random_checkpoint

CFG = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)


def test_refusals_are_one_line_errors(tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main(["from-deepspeed", *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megalite-convert: error: ")
        return lines[0]

    assert "no meta.json); give a step_N dir written by a zero" in error(
        [tmp_path / "nope", tmp_path / "out"]
    )
    dcp_ckpt = random_checkpoint(tmp_path / "dcp", CFG)
    assert "was not written by DeepSpeed; it is already DCP" in error([dcp_ckpt, tmp_path / "o"])
    ds_ckpt = tmp_path / "ds"
    ds_ckpt.mkdir()
    write_meta(ds_ckpt, step=3, tokens=0, world_size=2, engine="deepspeed", model=CFG)
    assert "exists; choose a new directory" in error([ds_ckpt, dcp_ckpt])
    assert not (tmp_path / "o").exists()


def test_a_deepspeed_checkpoint_is_refused_for_inference_with_the_command_to_convert(tmp_path):
    ckpt = random_checkpoint(tmp_path / "ckpt", CFG)
    meta = read_meta(ckpt)
    write_meta(ckpt, **{**meta, "engine": "deepspeed", "model": CFG})
    with pytest.raises(
        CheckpointError, match=r"convert it first \(megalite-convert from-deepspeed .*ckpt <new"
    ):
        load_for_inference(ckpt)
