"""`megalite-data prepare`: raw text -> filtered, deduplicated documents -> tokenizer -> packed
samples -> mosaicml-streaming MDS shards + manifest.json (layout: `megalite/data/common.py`).

The inputs are read in three passes, so memory stays proportional to the number of documents,
never to their text:

1. scan, as `tasks` independent tasks over the input files (tasks.py): decode, blocklist,
   Gopher heuristics, language, quality classifier, PII scrubbing, decontamination (scan.py),
   each survivor's exact-dedup key, split hash and MinHash signature; then the merge: exact
   and near duplicates removed across all tasks (first occurrence kept; dedup.py), and every
   removed document listed in removed.jsonl (removed.py);
2. train the BPE tokenizer on the training documents (skipped when `--tokenizer` is given);
3. tokenize, pack (`pack.py`) and write the shards of each split.

Passes 1 and 3 run in `workers` processes on chunks of consecutive documents whose results are
consumed in input order, so the output is byte-identical for any number of workers or tasks.

The split is by document: the `val_fraction` of kept documents with the lowest hash of
(seed, key) go to validation (at least one, and at least one left for training), so no validation
text leaks into training and the split does not depend on the worker count or on where the corpus
sits on disk. Everything is written to a temporary dir that is renamed into place at the end: an
interrupted run leaves nothing half-written, and an existing dataset is replaced only with
`overwrite`. Every option and input is checked before the expensive work starts.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megalite.data.common import (
    EOS,
    FORMAT,
    MANIFEST,
    TOKENIZER,
    DataError,
    file_sha256,
    read_manifest,
)
from megalite.data.filters import FILTERS, FilterOptions
from megalite.data.quality import versioned_name
from megalite.data.readers import UTF8_POLICIES, InputFile, discover, shakespeare_dir
from megalite.data.removed import REMOVED, write_removed
from megalite.data.scan import STAGES, build_settings
from megalite.data.shards import shard_stats, train_texts, write_shards
from megalite.data.tasks import VAL, Merged, Plan, make_plan, merge, run_local, run_task
from megalite.data.tokenizer import load_tokenizer, train_bpe, vocab_size
from megalite.data.workers import Bars, worker_pool

__all__ = [
    "EOS",
    "MANIFEST",
    "TOKENIZER",
    "DataError",
    "PrepareOptions",
    "file_sha256",
    "prepare",
    "read_manifest",
    "shakespeare_dir",
]


@dataclass
class PrepareOptions:
    """Every option of `megalite-data prepare`; a `--config` YAML file uses the same names."""

    inputs: list[str]
    out: str
    seq_len: int = 128
    vocab_size: int = 4096
    val_fraction: float = 0.05
    # An existing tokenizer.json or tiktoken encoding file instead of training one.
    tokenizer: str | None = None
    tiktoken_pattern: str | None = None
    eos_token: str = EOS
    # Special tokens of a trained tokenizer (ids 0, 1, ...); eos_token is added if missing.
    special_tokens: list[str] = field(default_factory=lambda: [EOS])
    text_field: str = "text"  # JSON field / parquet column holding the text
    on_bad_utf8: str = "error"  # error | replace | skip
    filters: FilterOptions = field(default_factory=FilterOptions)
    dedup: bool = True
    # MinHash + LSH near-duplicate removal (dedup.py documents the parameters).
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    near_dedup_ngram: int = 5
    near_dedup_num_perm: int = 128
    # Keep documents in these languages (ISO 639-1) with langid probability >= the threshold.
    languages: list[str] | None = None
    language_threshold: float = 0.5
    # A fastText model from `megalite-data train-quality`; keep P(hq) >= quality_threshold.
    quality_model: str | None = None
    quality_threshold: float = 0.5
    pii: bool = False  # replace e-mails, IP addresses and phone numbers by placeholders
    blocklist: str | None = None  # a file of blocked domains / URLs
    url_field: str = "url"  # the JSON field holding a document's URL
    decontaminate: list[str] = field(default_factory=list)  # evaluation sets
    decontam_ngram: int = 13
    doc_boundaries: bool = False  # also write a `doc_starts` column
    overwrite: bool = False
    compression: str | None = None  # any mosaicml-streaming compression, e.g. zstd
    shard_size_limit: int = 1 << 26
    seed: int = 0
    workers: int = 1
    # Independent scan tasks over the input files (tasks.py), and where their results go
    # (None: .<out name>.tasks beside --out).
    tasks: int = 1
    work_dir: str | None = None
    progress: bool | None = None  # None: on when stderr is a terminal


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ validation
def _check_options(opts: PrepareOptions) -> Path:
    out = Path(opts.out)
    if opts.seq_len < 1:
        raise DataError(f"--seq-len={opts.seq_len} must be >= 1")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise DataError(f"--val-fraction={opts.val_fraction} must be in [0, 1)")
    if opts.workers < 1:
        raise DataError(f"--workers={opts.workers} must be >= 1")
    if opts.tasks < 1:
        raise DataError(f"--tasks={opts.tasks} must be >= 1")
    if opts.shard_size_limit < 1:
        raise DataError(f"--shard-size={opts.shard_size_limit} must be a positive byte count")
    if opts.on_bad_utf8 not in UTF8_POLICIES:
        raise DataError(
            f"--on-bad-utf8={opts.on_bad_utf8!r} is not one of {', '.join(UTF8_POLICIES)}"
        )
    if opts.compression is not None:
        from streaming.base.compression import get_compressions

        if opts.compression not in get_compressions():
            raise DataError(
                f"--compression={opts.compression!r} is not a mosaicml-streaming compression; "
                "use zstd, gz, br, bz2 or snappy (optionally with a level, e.g. zstd:7)"
            )
    opts.filters.validate()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not opts.overwrite:
        raise DataError(
            f"output dir {str(out)!r} already exists and is not empty; pass --overwrite to "
            "replace it, or choose another --out"
        )
    return out


def _special_tokens(opts: PrepareOptions) -> list[str]:
    specials = list(opts.special_tokens)
    if opts.eos_token not in specials:
        specials.insert(0, opts.eos_token)
    return specials


def _plan(opts: PrepareOptions) -> tuple[Path, list[InputFile], int, Plan, dict]:
    """Checks everything and plans the tasks; raises DataError before any expensive work."""
    out = _check_options(opts)
    files, ignored = discover(opts.inputs, opts.text_field)
    settings, fingerprint, entries = build_settings(opts)
    plan = make_plan(files, opts.tasks, out, settings, fingerprint, opts.work_dir)
    return out, files, ignored, plan, entries


def prepare_task(opts: PrepareOptions, k: int) -> Path:
    """Runs task k of opts.tasks alone (a SLURM array element, or a rerun); returns its result.
    A task already done for these options and unchanged files is not redone."""
    _, _, _, plan, _ = _plan(opts)
    if 0 <= k < plan.tasks and plan.done(k):
        return plan.result_path(k)
    bars = Bars(sys.stderr.isatty() if opts.progress is None else opts.progress)
    try:
        return run_task(plan, k, opts.workers, bars)
    finally:
        bars.close()


def _nothing_left_error(opts: PrepareOptions, scan: Merged) -> DataError:
    n = scan.documents_in
    drops = {k: v for k, v in scan.dropped.items() if v}
    others = {k: v for k, v in scan.stages.items() if k not in ("read", "heuristics") and v}
    if set(drops) <= {"empty", "bad_utf8"} and not others:
        utf8 = f", {drops['bad_utf8']} skipped as not UTF-8" if drops.get("bad_utf8") else ""
        return DataError(
            f"inputs {opts.inputs} hold no text ({n} documents, none with at least "
            f"{opts.filters.min_chars} non-blank characters{utf8}); point at files with text"
        )
    return DataError(
        f"every document of {opts.inputs} was filtered out ({n} in; dropped {drops}, "
        f"{scan.duplicates} duplicates, by stage {dict(scan.stages)}); relax the quality "
        f"filters ({opts.filters.enabled()}) or the stages that removed them"
    )


def _assign_split(scan: Merged, val_fraction: float) -> tuple[int, int]:
    kept = len(scan.split_hashes)
    if kept < 2 and val_fraction > 0:
        raise DataError(
            f"only {kept} document(s) after filtering; a by-document validation split needs "
            "at least 2 (add text, or pass --val-fraction 0)"
        )
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * kept))
    n_val = min(n_val, kept - 1)
    order = np.argsort(np.array(scan.split_hashes, dtype=np.uint64), kind="stable")
    is_val = np.zeros(kept, bool)
    is_val[order[:n_val]] = True
    k = 0
    for i, d in enumerate(scan.decisions):
        if d:
            if is_val[k]:
                scan.decisions[i] = VAL
            k += 1
    return kept - n_val, n_val


# ----------------------------------------------------------------------------------- main
def prepare(opts: PrepareOptions, run_tasks: bool = True) -> dict:
    """Runs the whole pipeline and returns the manifest. Raises DataError before writing
    anything when an input or option is bad, and leaves no output when anything fails.
    `run_tasks=False` (`--merge`) only merges tasks that already ran (a SLURM array's)."""
    t0 = time.time()
    # mosaicml-streaming, needed only to write the shards, takes seconds to import (it imports
    # torch and transformers): import it in the background while the inputs are scanned.
    threading.Thread(target=importlib.import_module, args=("streaming",), daemon=True).start()
    out, files, ignored, plan, entries = _plan(opts)
    specials = _special_tokens(opts)
    given_tokenizer = None
    if opts.tokenizer:
        given_tokenizer, tokenizer_kind = load_tokenizer(
            opts.tokenizer, specials, opts.tiktoken_pattern
        )
    elif opts.vocab_size < 256 + len(specials):
        raise DataError(
            f"--vocab-size={opts.vocab_size} is smaller than the 256 byte tokens plus "
            f"{len(specials)} special tokens; use at least 512"
        )
    bytes_in = sum(f.size for f in files)
    progress = sys.stderr.isatty() if opts.progress is None else opts.progress
    bars = Bars(progress)
    ctx: dict = {"scan": plan.settings}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        ran = run_local(plan, opts.workers, bars) if run_tasks else []
        scan = merge(plan, bars)
        if not scan.split_hashes:
            raise _nothing_left_error(opts, scan)
        n_train, n_val = _assign_split(scan, opts.val_fraction)

        if given_tokenizer is not None:
            tokenizer = given_tokenizer
            source = str(opts.tokenizer)
        else:
            texts = train_texts(files, plan.settings, scan.decisions, bars)
            tokenizer = train_bpe(texts, opts.vocab_size, specials, length=n_train)
            tokenizer_kind, source = "bpe", "trained"
        eos_id = tokenizer.token_to_id(opts.eos_token)
        if eos_id is None:
            raise DataError(
                f"the tokenizer has no {opts.eos_token!r} token; add it as a special token"
            )
        vocab = vocab_size(tokenizer)

        tmp.mkdir(parents=True)
        tokenizer.save(str(tmp / TOKENIZER))
        if tokenizer_kind == "tiktoken":
            shutil.copy(opts.tokenizer, tmp / "tokenizer.tiktoken")
        ctx.update(tokenizer_json=tokenizer.to_str(), eos_id=eos_id)
        with worker_pool(opts.workers, ctx) as pool:
            packed = write_shards(files, opts, scan.decisions, tmp, vocab, pool, bars)
        bars.close()
        if packed["samples"]["train"] == 0:
            raise DataError(
                f"the training split has {packed['tokens']['train']} tokens, fewer than one "
                f"sample of --seq-len={opts.seq_len} + 1; add text or lower --seq-len"
            )
        if opts.val_fraction > 0 and packed["samples"]["val"] == 0:
            raise DataError(
                f"the validation split has {packed['tokens']['val']} tokens, fewer than one "
                f"sample of --seq-len={opts.seq_len} + 1; raise --val-fraction or lower --seq-len"
            )
        if packed["samples"]["val"] == 0:
            shutil.rmtree(tmp / "val")
        splits = {s: shard_stats(tmp / s) for s in ("train", "val") if (tmp / s).is_dir()}
        write_removed(tmp / REMOVED, scan.removed)
        if opts.quality_model:
            # The model beside the manifest, named by its hash: the dataset says which
            # classifier chose its documents, and a retrained model never overwrites it.
            name = versioned_name(entries["quality_model"]["sha256"])
            shutil.copy(opts.quality_model, tmp / name)
            entries["quality_model"]["file"] = name
        if entries["decontamination"] is not None:
            entries["decontamination"]["documents_removed"] = scan.stages["decontamination"]
        seconds = time.time() - t0
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": opts.inputs,
            "files": len(files),
            "files_ignored": ignored,
            "bytes_in": bytes_in,
            "bytes_kept": scan.bytes_kept,
            "documents_in": scan.documents_in,
            "documents_out": n_train + n_val,
            "dropped": {name: scan.dropped.get(name, 0) for name in FILTERS},
            "duplicates_removed": scan.duplicates,
            "near_duplicates_removed": scan.near_duplicates,
            "removed": {
                stage: {"documents": scan.stages[stage], "bytes": scan.stage_bytes[stage]}
                for stage in STAGES
                if scan.stages[stage]
            },
            "pii_replaced": scan.pii if opts.pii else None,
            **entries,
            "tasks": {"count": opts.tasks, "ran_here": ran},
            "utf8_replaced_documents": scan.replaced_utf8,
            "documents": {"train": n_train, "val": n_val},
            "val_documents": packed["val_documents"],
            "tokens": packed["tokens"],
            "tail_tokens_dropped": packed["tail_tokens_dropped"],
            "samples": packed["samples"],
            "shards": {s: v["shards"] for s, v in splits.items()},
            "shard_bytes": {s: v["bytes"] for s, v in splits.items()},
            "index_sha256": {s: v["index_sha256"] for s, v in splits.items()},
            "compression": opts.compression,
            "doc_boundaries": opts.doc_boundaries,
            "seq_len": opts.seq_len,
            "vocab_size": vocab,
            "eos_token": opts.eos_token,
            "eos_id": eos_id,
            "special_tokens": specials,
            "tokenizer": {"kind": tokenizer_kind, "source": source},
            "tokenizer_sha256": file_sha256(tmp / TOKENIZER),
            "unigram_val_loss": packed["unigram_val_loss"],
            "options": asdict(opts),
            "seconds": round(seconds, 2),
            "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{time.time_ns()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        bars.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if opts.tasks == 1:  # nothing to resume: a failed one-task run leaves nothing behind
            _remove_work(plan, opts)
        raise
    _remove_work(plan, opts)  # the tasks' results are needed only until the dataset exists
    return manifest


def _remove_work(plan: Plan, opts: PrepareOptions) -> None:
    shutil.rmtree(plan.work, ignore_errors=True)
    if not opts.work_dir and plan.work.parent.is_dir() and not any(plan.work.parent.iterdir()):
        plan.work.parent.rmdir()
