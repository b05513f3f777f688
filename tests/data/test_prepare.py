"""`megalite-data prepare`: split by document, packing without padding, manifest, clear errors,
nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megalite.data.prepare import DataError, PrepareOptions, prepare, read_manifest
from tests.conftest import BIN, run_cli


def read_samples(split_dir: Path) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    rows = np.stack([ds.get_item(i)["tokens"] for i in range(ds.num_samples)])
    del ds
    return rows


def test_manifest_and_split(tiny_data):
    m = read_manifest(tiny_data)
    assert m["documents"] == {"train": 3, "val": 1}
    assert m["seq_len"] == 32 and m["vocab_size"] == 512
    assert m["samples"]["train"] == (m["tokens"]["train"] - 1) // 32
    assert 0 < m["unigram_val_loss"] < np.log(512)
    assert set(m["val_documents"]).isdisjoint(
        {Path(p).name for p in m["options"]["inputs"]}  # inputs is the folder, not the plays
    )
    assert (tiny_data / "tokenizer.json").is_file()


def test_packing_is_contiguous_and_unpadded(tiny_data):
    """Sample i's last token is sample i+1's first: every token is a target exactly once."""
    rows = read_samples(tiny_data / "train")
    assert rows.shape[1] == 33
    assert np.array_equal(rows[:-1, -1], rows[1:, 0])
    m = read_manifest(tiny_data)
    eos = m["eos_id"]
    assert (rows == eos).sum() >= m["documents"]["train"] - 1  # documents joined with EOS


def test_tokenizer_round_trips_text(tiny_data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    text = "To be, or not to be, that is the question:"
    assert tok.decode(tok.encode(text).ids) == text


def test_existing_output_is_never_overwritten(tiny_corpus, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists and is not empty; pass --overwrite"):
        prepare(PrepareOptions(inputs=[str(tiny_corpus)], out=str(out), seq_len=32, vocab_size=512))
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [str(d / "nope")], "does not exist"),
        (lambda d: [str((d / "empty").mkdir() or d / "empty")], "holds no .txt files"),
        (lambda d: [str(_write(d / "blank.txt", "  \n\n "))] * 1, "hold no text"),
        (
            lambda d: [str(_write_bytes(d / "latin1.txt", "caf\xe9".encode("latin-1")))],
            "not valid UTF-8",
        ),
        (lambda d: [str(_write(d / "a.csv", "x"))], "is not a .txt file"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, setup, message):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(PrepareOptions(inputs=setup(tmp_path), out=str(out), seq_len=32, vocab_size=512))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_cli_prepare_and_stats(tiny_corpus, tmp_path):
    out = tmp_path / "cli"
    res = run_cli(
        [
            str(BIN / "megalite-data"),
            "prepare",
            str(tiny_corpus),
            "--out",
            str(out),
            "--seq-len",
            "16",
            "--vocab-size",
            "300",
            "--val-fraction",
            "0.25",
        ]
    )
    assert res.returncode == 0, res.stderr
    assert "unigram val loss" in res.stdout
    stats = run_cli([str(BIN / "megalite-data"), "stats", str(out)])
    assert stats.returncode == 0 and json.loads(stats.stdout)["seq_len"] == 16
    again = run_cli([str(BIN / "megalite-data"), "prepare", str(tiny_corpus), "--out", str(out)])
    assert again.returncode == 2
    assert again.stderr.startswith("megalite-data: error:") and "Traceback" not in again.stderr
