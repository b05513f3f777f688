"""Names and helpers shared by data preparation and loading: the dataset layout, the error class,
the manifest reader.

A prepared dataset (the output of `megalite-data prepare`, the trainer's `data.dir` or a stream's
remote) is laid out as

    manifest.json     counts, tokenizer hash, vocab size, seq_len, index hashes, options
    tokenizer.json    the tokenizer (HF `tokenizers` format) the shards were tokenized with
    train/, val/      mosaicml-streaming MDS shards + index.json; column `tokens`
                      (seq_len + 1 ids per sample), optionally `doc_starts`
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megalite.errors import DataError  # noqa: F401  (the data package's error)

EOS = "<|endoftext|>"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
INDEX = "index.json"
SPLITS = ("train", "val")
# v2 added index hashes, filter counts and the optional doc_starts column; v1 datasets still load.
FORMAT = "megalite-mds-v2"
FORMATS = ("megalite-mds-v1", FORMAT)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(path)!r} is missing; is {str(data_dir)!r} a prepared dataset?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{str(path)!r} is not valid JSON ({e}); re-run megalite-data prepare"
        ) from e
    if manifest.get("format") not in FORMATS:
        raise DataError(
            f"{str(path)!r} has format {manifest.get('format')!r}, not one of {FORMATS}; "
            "re-run megalite-data prepare with this version of megalite"
        )
    return manifest
