"""`prepare` as independent tasks over the input files: one task and four tasks (four local
processes) keep the same documents and write the same shards; a task that fails leaves the
others' results, and the rerun runs it alone (also by hand: `--task K`, then `--merge`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalite.data.prepare import DataError, PrepareOptions, prepare
from tests.conftest import BIN, run_cli
from tests.data.planted import build, removed

STAGES = dict(
    seq_len=32,
    vocab_size=512,
    near_dedup=True,
    near_dedup_threshold=0.3,
    pii=True,
    progress=False,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("planted"), originals=100, copies=30).files[0].parent


@pytest.fixture(scope="module")
def one_task(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    prepare(PrepareOptions(inputs=[str(corpus)], out=str(out), **STAGES))
    return out


def relative(records: list[dict]) -> list[dict]:
    """Removal records with sources as file names (the two corpora sit in different dirs)."""
    return [
        {k: Path(v).name if k in ("source", "match") else v for k, v in r.items()} for r in records
    ]


def same_dataset(a: Path, b: Path) -> None:
    """Same removals, same documents per split, byte-identical shards."""
    assert relative(removed(a)) == relative(removed(b))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for key in ("documents", "tokens", "samples", "index_sha256", "val_documents", "removed"):
        assert ma[key] == mb[key], key
    for split in ("train", "val"):
        for shard in sorted((a / split).iterdir()):
            assert shard.read_bytes() == (b / split / shard.name).read_bytes()


def test_four_tasks_keep_the_same_documents_as_one(corpus, one_task, tmp_path):
    out = tmp_path / "out"
    m = prepare(PrepareOptions(inputs=[str(corpus)], out=str(out), tasks=4, workers=2, **STAGES))
    assert m["tasks"] == {"count": 4, "ran_here": [0, 1, 2, 3]}
    # Near-duplicates across files (so across tasks) were found: copies sit in other files.
    cross = [
        r
        for r in removed(out)
        if r["stage"] == "near_dedup" and r["source"].split(":")[0] != r["match"].split(":")[0]
    ]
    assert len(cross) >= 25
    same_dataset(one_task, out)
    assert not (tmp_path / ".out.tasks").exists()  # task results go once the dataset exists


@pytest.mark.slow
def test_a_failed_task_is_rerun_alone(corpus, one_task, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted(corpus.iterdir()):
        (inputs / f.name).write_bytes(f.read_bytes())
    bad = inputs / "part-2.jsonl"
    good = bad.read_bytes()
    bad.write_bytes(good + b'{"text": "a broken line\n')
    out = tmp_path / "out"
    opts = PrepareOptions(inputs=[str(inputs)], out=str(out), tasks=4, workers=2, **STAGES)
    with pytest.raises(DataError, match=r"1 of 4 prepare tasks failed \(2\); task 2: .*part-2"):
        prepare(opts)
    assert not out.exists()
    results = sorted(p.name for p in (tmp_path / ".out.tasks").glob("*/task-*.npz"))
    assert results == [f"task-0000{k}-of-00004.npz" for k in (0, 1, 3)]
    bad.write_bytes(good)
    # By hand, as a SLURM array element would: only task 2, then the merge.
    argv = [str(inputs), "--out", str(out), "--tasks", "4", "--seq-len", "32"]
    argv += ["--vocab-size", "512", "--near-dedup", "--near-dedup-threshold", "0.3", "--pii"]
    res = run_cli([str(BIN / "megalite-data"), "prepare", *argv, "--task", "2"], timeout=300)
    assert res.returncode == 0, res.stderr
    res = run_cli([str(BIN / "megalite-data"), "prepare", *argv, "--merge"], timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["tasks"] == {"count": 4, "ran_here": []}
    same_dataset(one_task, out)


def test_merge_without_every_task_names_the_missing_ones(corpus, tmp_path):
    opts = PrepareOptions(inputs=[str(corpus)], out=str(tmp_path / "out"), tasks=3, **STAGES)
    with pytest.raises(DataError, match=r"tasks \[0, 1, 2\] of 3 have no result"):
        prepare(opts, run_tasks=False)
    assert not (tmp_path / "out").exists()
