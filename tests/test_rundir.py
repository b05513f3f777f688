"""The run-dir and checkpoint layout (megalite/rundir.py): the names a run writes, which
checkpoint dirs count as complete, and meta.json written and read back."""

from __future__ import annotations

import json

import pytest

from megalite.config import ModelConfig
from megalite.errors import CheckpointError
from megalite.rundir import RANK_FILE, RunDir, rank_file, read_meta, write_meta


def test_paths_are_the_documented_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.config == tmp_path / "config.yaml"
    assert run.resumed_config("20260101-000000").name == "config.resumed-20260101-000000.yaml"
    assert (run.metrics.name, run.summary.name, run.loss_plot.name) == (
        "metrics.jsonl",
        "summary.json",
        "loss.png",
    )
    assert run.preempted == tmp_path / "PREEMPTED"
    assert run.latest == tmp_path / "checkpoints" / "latest"
    assert run.checkpoint(400) == tmp_path / "checkpoints" / "step_00000400"
    assert run.staging(400) == tmp_path / "checkpoints" / "step_00000400.tmp"
    assert rank_file(run.checkpoint(4), 3).name == "rank_00003.pt"
    assert RANK_FILE.match("rank_00003.pt").group(1) == "00003"
    assert RunDir.of_checkpoint(run.checkpoint(4)).path == tmp_path
    assert RunDir.of_checkpoint(tmp_path / "converted") is None


def test_only_complete_checkpoints_are_listed_in_step_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.complete_checkpoints() == [] and run.newest_checkpoint() is None
    for step in (100, 20, 300):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / "meta.json").write_text("{}")
    run.checkpoint(400).mkdir()  # no meta.json: a save that died
    run.staging(500).mkdir()
    (run.staging(500) / "meta.json").write_text("{}")  # not yet renamed
    (run.checkpoints / "step_abc").mkdir()
    assert [p.name for p in run.complete_checkpoints()] == [
        "step_00000020",
        "step_00000100",
        "step_00000300",
    ]
    assert run.newest_checkpoint() == run.checkpoint(300)


def test_meta_round_trip_and_clear_errors(tmp_path):
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    path = write_meta(
        tmp_path, step=7, tokens=900, world_size=2, engine="dcp", model=cfg, source={"a": 1}
    )
    meta = read_meta(tmp_path)
    assert meta == json.loads(path.read_text())
    assert (meta["step"], meta["tokens"], meta["world_size"], meta["engine"]) == (7, 900, 2, "dcp")
    assert ModelConfig(**meta["model"]) == cfg and meta["source"] == {"a": 1}
    with pytest.raises(CheckpointError, match=r"no meta.json\); pass a step dir"):
        read_meta(tmp_path / "nope", "pass a step dir")
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json' is not valid JSON"):
        read_meta(tmp_path)
    path.write_text("[1]")
    with pytest.raises(CheckpointError, match="is not a JSON object"):
        read_meta(tmp_path)
