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
        (
            lambda d: [str((d / "empty").mkdir() or d / "empty")],
            "holds no .jsonl.zst, .jsonl.gz, .jsonl, .parquet, .txt files",
        ),
        (lambda d: [str(_write(d / "blank.txt", "  \n\n "))] * 1, "hold no text"),
        (
            lambda d: [str(_write_bytes(d / "latin1.txt", "caf\xe9".encode("latin-1")))],
            "not valid UTF-8",
        ),
        (lambda d: [str(_write(d / "a.csv", "x"))], "is not a supported file type"),
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
            "--gopher",
            "--max-words",
            "1000000",  # a play is ~30k words: over Gopher's 100k? no, but keep them all
            "--compression",
            "zstd",
            "--shard-size",
            "64KB",
            "--doc-boundaries",
            "--workers",
            "2",
            "--progress",
        ]
    )
    assert res.returncode == 0, res.stderr
    assert "unigram val loss" in res.stdout
    assert "tokenize + pack" in res.stderr  # --progress forces the bars off a terminal
    m = read_manifest(out)
    assert m["options"]["filters"]["min_words"] == 50 and m["options"]["workers"] == 2
    assert m["compression"] == "zstd" and m["doc_boundaries"] and m["shards"]["train"] > 1
    assert all(p.name.endswith(".mds.zstd") for p in (out / "train").glob("shard.*"))
    stats = run_cli([str(BIN / "megalite-data"), "stats", str(out), "--json"])
    assert stats.returncode == 0 and json.loads(stats.stdout)["seq_len"] == 16
    table = run_cli([str(BIN / "megalite-data"), "stats", str(out), "--verify"])
    assert table.returncode == 0, table.stderr
    assert "documents           4 in -> 4 out (train 3, val 1)" in table.stdout
    assert "every shard matches its sha1" in table.stdout
    again = run_cli([str(BIN / "megalite-data"), "prepare", str(tiny_corpus), "--out", str(out)])
    assert again.returncode == 2
    assert again.stderr.startswith("megalite-data: error:") and "Traceback" not in again.stderr


# ------------------------------------------------------------------ formats, workers, counts
def read_split(split_dir: Path) -> tuple[np.ndarray, list[list[int]] | None]:
    """All samples of a split in order: tokens, and doc_starts when written."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    items = [ds.get_item(i) for i in range(ds.num_samples)]
    del ds
    starts = [it["doc_starts"] for it in items] if "doc_starts" in items[0] else None
    return np.stack([it["tokens"] for it in items]), starts


def expected_samples(docs: list[str], tokenizer_file: Path, seq_len: int) -> np.ndarray:
    """The packing rule computed directly: docs + EOS, windows of seq_len + 1, stride seq_len."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.encode_special_tokens = True
    eos = tok.token_to_id("<|endoftext|>")
    stream = [t for d in docs for t in (*tok.encode(d, add_special_tokens=False).ids, eos)]
    n = (len(stream) - 1) // seq_len
    return np.array([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def test_every_input_format_gives_the_packed_token_stream(tmp_path, paragraphs, tiny_data):
    from tests.data.test_readers_filters import write_jsonl, write_parquet

    docs = paragraphs[:80]
    tokenizer = tiny_data / "tokenizer.json"
    expected = expected_samples(docs, tokenizer, 16)
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        path = tmp_path / name
        write_parquet(path, docs) if name.endswith("parquet") else write_jsonl(path, docs)
        out = tmp_path / f"out-{name}"
        m = prepare(
            PrepareOptions(
                inputs=[str(path)],
                out=str(out),
                seq_len=16,
                val_fraction=0,
                tokenizer=str(tokenizer),
            )
        )
        rows, _ = read_split(out / "train")
        assert np.array_equal(rows, expected), name
        assert m["documents_out"] == len(docs)
        tail = m["tail_tokens_dropped"]["train"]
        assert m["tokens"]["train"] == len(expected) * 16 + 1 + tail
        assert m["tokenizer"] == {"kind": "tokenizer.json", "source": str(tokenizer)}


def _dataset_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, paragraphs):
    from megalite.data.filters import FilterOptions
    from tests.data.test_readers_filters import write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", paragraphs + paragraphs[:30])  # with duplicates
    manifests, files = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        manifests[workers] = prepare(
            PrepareOptions(
                inputs=[str(corpus)],
                out=str(out),
                seq_len=32,
                vocab_size=300,
                val_fraction=0.1,
                filters=FilterOptions(min_words=12),
                doc_boundaries=True,
                workers=workers,
            )
        )
        files[workers] = _dataset_files(out)
    assert files[1] == files[2]  # shards, indexes and tokenizer, byte for byte
    varying = {"created", "seconds", "mb_per_s", "options"}
    assert {k: v for k, v in manifests[1].items() if k not in varying} == {
        k: v for k, v in manifests[2].items() if k not in varying
    }
    # The same counts by a direct reading of the rules.
    seen, duplicates, short = set(), 0, 0
    for doc in paragraphs + paragraphs[:30]:
        key = " ".join(doc.lower().split())
        if len(doc.split()) < 12:
            short += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
    assert manifests[1]["dropped"]["min_words"] == short > 0
    assert manifests[1]["duplicates_removed"] == duplicates >= 30 - short


def test_manifest_counts_every_drop_and_duplicate(tmp_path, paragraphs):
    from megalite.data.filters import FilterOptions

    good = paragraphs[:40]
    lines = [json.dumps({"text": d}).encode() for d in good]
    lines += [json.dumps({"text": t}).encode() for t in ("too short", "also short", "   ")]
    lines.append(json.dumps({"text": "\n".join(["\u2022 one two three four five"] * 6)}).encode())
    lines += [json.dumps({"text": t}).encode() for t in (good[0].upper(), f"  {good[1]}\n")]
    lines.append(b'{"text": "caf\xe9 latin-1 bytes in a long enough document here"}')
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    m = prepare(
        PrepareOptions(
            inputs=[str(tmp_path / "c.jsonl")],
            out=str(tmp_path / "out"),
            seq_len=16,
            vocab_size=300,
            val_fraction=0.1,
            on_bad_utf8="skip",
            filters=FilterOptions(min_words=5, max_bullet_line_fraction=0.5),
        )
    )
    assert m["documents_in"] == len(lines)
    assert m["documents_out"] == len(good)
    assert m["dropped"] == {
        "bad_utf8": 1,
        "empty": 1,
        "min_words": 2,
        "max_words": 0,
        "mean_word_length": 0,
        "symbol_word_ratio": 0,
        "ellipsis_lines": 0,
        "bullet_lines": 1,
    }
    assert m["duplicates_removed"] == 2
    assert m["documents"] == {"train": 36, "val": 4}
    assert all(name.startswith("c.jsonl:") for name in m["val_documents"])


def test_every_document_filtered_out_is_a_clear_error(tmp_path, paragraphs):
    from megalite.data.filters import FilterOptions
    from tests.data.test_readers_filters import write_jsonl

    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"every document .* was filtered out .*min_words.: 5"):
        prepare(
            PrepareOptions(
                inputs=[str(write_jsonl(tmp_path / "c.jsonl", paragraphs[:5]))],
                out=str(out),
                filters=FilterOptions(min_words=100_000),
            )
        )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_doc_starts_mark_exactly_the_document_starts(tmp_path, paragraphs, tiny_data):
    from tests.data.test_readers_filters import write_jsonl

    docs = paragraphs[:40] + ["a speech that spells <|endoftext|> in its text"]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    m = prepare(
        PrepareOptions(
            inputs=[str(corpus)],
            out=str(out),
            seq_len=16,
            val_fraction=0,
            tokenizer=str(tiny_data / "tokenizer.json"),
            doc_boundaries=True,
        )
    )
    rows, starts = read_split(out / "train")
    eos = m["eos_id"]
    stream = np.concatenate([rows[0], *(r[1:] for r in rows[1:])])
    # Literal "<|endoftext|>" in a document is text: EOS ends documents and nothing else.
    assert (stream == eos).sum() == len(docs) - (stream[-1] != eos)
    for i, (row, s) in enumerate(zip(rows, starts)):
        after_eos = {p + 1 for p in np.flatnonzero(row[:-1] == eos)}
        begins = i == 0 or rows[i - 1][-2] == eos
        assert set(s) == after_eos | ({0} if begins else set()), i


# --------------------------------------------------------------------------------- tokenizers
def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    import base64

    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_tiktoken_encoding_file_is_converted_exactly(tmp_path, paragraphs):
    import contextlib
    import io

    import tiktoken
    from tiktoken._educational import bpe_train

    from megalite.data.tokenizer import DEFAULT_TIKTOKEN_PATTERN

    text = "\n\n".join(paragraphs[:30])
    with contextlib.redirect_stdout(io.StringIO()):  # bpe_train prints its merges
        ranks = bpe_train(text, 300, DEFAULT_TIKTOKEN_PATTERN)
    path = write_tiktoken(tmp_path / "tiny.tiktoken", ranks)
    docs = paragraphs[30:60] + ["caf\u00e9 \u65e5\u672c 12345  spaces\t\ttabs\n\n"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    m = prepare(
        PrepareOptions(
            inputs=[str(corpus)], out=str(out), seq_len=16, val_fraction=0, tokenizer=str(path)
        )
    )
    enc = tiktoken.Encoding(
        "tiny",
        pat_str=DEFAULT_TIKTOKEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    stream = [t for d in docs for t in (*enc.encode_ordinary(d), enc.eot_token)]
    rows, _ = read_split(out / "train")
    packed = np.concatenate([rows[0], *(r[1:] for r in rows[1:])])
    assert packed.tolist() == stream[: len(packed)]
    assert m["vocab_size"] == len(ranks) + 1 and m["eos_id"] == len(ranks)
    assert m["tokenizer"]["kind"] == "tiktoken" and (out / "tokenizer.tiktoken").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not-base64!! 0\n", r"bad.tiktoken:1 is not a '<base64 token> <rank>' line"),
        (b"YQ== 0\nYg== 1\n", r"has no rank for byte 0x00 \(254 of 256 bytes missing\)"),
    ],
)
def test_bad_tokenizer_files_fail_before_reading(tmp_path, tiny_corpus, content, message):
    (tmp_path / "bad.tiktoken").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(
            PrepareOptions(
                inputs=[str(tiny_corpus)],
                out=str(tmp_path / "out"),
                tokenizer=str(tmp_path / "bad.tiktoken"),
            )
        )


def test_tokenizer_json_without_the_eos_token_is_refused(tmp_path, tiny_corpus, tiny_data):
    with pytest.raises(DataError, match=r"has no token '</s>'; .* --eos-token"):
        prepare(
            PrepareOptions(
                inputs=[str(tiny_corpus)],
                out=str(tmp_path / "out"),
                tokenizer=str(tiny_data / "tokenizer.json"),
                eos_token="</s>",
            )
        )
