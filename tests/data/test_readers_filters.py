"""Reading every input format, the non-UTF-8 policies, each quality filter and the dedup key."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megalite.data.common import DataError
from megalite.data.filters import GOPHER, FilterOptions, dedup_key, quality_verdict
from megalite.data.readers import decode, discover, iter_raw

DOCS = ["first document\nwith two lines", "second: caf\u00e9 \u65e5\u672c", "third"]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
    data = lines.encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, docs: list[str | None], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=2)
    return path


def texts(inputs: list[str], field: str = "text", policy: str = "error") -> list[str | None]:
    files, _ = discover(inputs, field)
    return [decode(doc, field, policy)[0] for doc, _ in iter_raw(files, field)]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst"])
def test_jsonl_plain_gzip_and_zstd_read_the_same_documents(tmp_path, name):
    path = write_jsonl(tmp_path / name, DOCS, field="body")
    assert texts([str(path)], field="body") == DOCS


def test_parquet_rows_and_nested_json_fields(tmp_path):
    assert texts([str(write_parquet(tmp_path / "c.parquet", DOCS))]) == DOCS
    nested = tmp_path / "n.jsonl"
    nested.write_text("".join(json.dumps({"meta": {"content": d}}) + "\n" for d in DOCS))
    assert texts([str(nested)], field="meta.content") == DOCS


def test_folders_are_read_in_sorted_order_and_other_files_ignored(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", DOCS)
    files, ignored = discover([str(tmp_path)])
    assert [f.path.name for f in files] == ["a.txt", "b.txt", "c.jsonl"]
    assert ignored == 1
    keys = [doc.key for doc, _ in iter_raw(files)]
    assert keys == ["a.txt", "b.txt", "c.jsonl:1", "c.jsonl:2", "c.jsonl:3"]


def test_bad_utf8_policies(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "caf\xe9"}\n{"text": "lone \\ud800"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2 is not valid UTF-8 .*--on-bad-utf8"):
        texts([str(path)])
    assert texts([str(path)], policy="skip") == ["good", None, None]
    assert texts([str(path)], policy="replace") == ["good", "caf\ufffd", "lone \ufffd"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2 is not valid JSON"),
        (b'{"body": "x"}\n', r"bad.jsonl:1 has no field 'text' \(fields: body\); pass --text"),
        (b'{"text": 3}\n', r"field 'text' is a int, not a string"),
        (b"[1, 2]\n", r"is a JSON list, not an object"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        texts([str(tmp_path / "bad.jsonl")])


def test_bad_files_are_refused_before_reading(tmp_path):
    with pytest.raises(DataError, match="has no column 'text' \\(columns: body, n\\)"):
        discover([str(write_parquet(tmp_path / "p.parquet", DOCS, field="body"))])
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    files, _ = discover([str(tmp_path / "x.jsonl.gz")])
    with pytest.raises(DataError, match="is not a valid gz file"):
        list(iter_raw(files))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="'.*data.csv' is not a supported file type"):
        discover([str(tmp_path / "data.csv")])


def test_each_quality_filter_drops_what_it_should():
    opts = GOPHER
    prose = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)  # 90 words
    assert quality_verdict(prose, opts) is None
    assert quality_verdict("   \n ", opts) == "empty"
    assert quality_verdict("too few words here", opts) == "min_words"
    assert quality_verdict("word " * 100_001, opts) == "max_words"
    assert quality_verdict(" ".join(["a b"] * 40), opts) == "mean_word_length"
    assert quality_verdict(" ".join(["incomprehensibilities"] * 60), opts) == "mean_word_length"
    assert quality_verdict(prose + " #tag" * 10, opts) is None  # 10 per 100 words: the limit
    assert quality_verdict(prose + " #tag" * 11, opts) == "symbol_word_ratio"
    lines = [f"line {i} of a story that trails off ..." for i in range(8)]
    assert quality_verdict("\n".join(lines + [prose]), opts) == "ellipsis_lines"
    bullets = [f"\u2022 item {i} the quick brown fox jumps" for i in range(20)]
    assert quality_verdict("\n".join(bullets + [prose]), opts) == "bullet_lines"
    # Off by default: only blank documents are dropped.
    assert quality_verdict("too few words here", FilterOptions()) is None


def test_filter_options_are_checked():
    with pytest.raises(DataError, match=r"--min-words=10 > --max-words=5"):
        FilterOptions(min_words=10, max_words=5).validate()
    with pytest.raises(DataError, match=r"--max-bullet-line-fraction=1.5 is a fraction"):
        FilterOptions(max_bullet_line_fraction=1.5).validate()


def test_dedup_key_ignores_case_spacing_and_unicode_forms():
    assert dedup_key("Hello  World\n") == dedup_key("hello world")
    assert dedup_key("\ufb01ne") == dedup_key("fine")  # NFKC: the ligature is two letters
    assert dedup_key("hello world") != dedup_key("hello, world")
