"""The per-document stages of a prepare task, run in worker processes on chunks of documents.

In order; a document stops at the first stage that removes it:

  stage            removes when                                              module
  read             its bytes are not UTF-8 (--on-bad-utf8 skip)              readers.py
  blocklist        its URL field is on a blocklisted domain                  decontam.py
  heuristics       a Gopher-style filter fails (reason: the filter)          filters.py
  language         langid's language is not kept, or below the threshold     quality.py
  quality          the fastText classifier's P(hq) is below the threshold    quality.py
  (pii)            nothing: e-mails, IPs, phone numbers become placeholders  pii.py
  decontamination  it shares an n-gram with an evaluation text               decontam.py

Surviving documents carry their exact-dedup key and MinHash signature (both of the text after
PII scrubbing) to the merge step, which removes exact and near duplicates across all tasks
(tasks.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from megalite.data.common import file_sha256
from megalite.data.decontam import Blocklist, EvalIndex
from megalite.data.dedup import NearDedupOptions, signature
from megalite.data.filters import FilterOptions, dedup_key, quality_verdict
from megalite.data.readers import RawDoc, decode
from megalite.data.workers import WORKER

if TYPE_CHECKING:
    from megalite.data.prepare import PrepareOptions

STAGES = (
    "read",
    "blocklist",
    "heuristics",
    "language",
    "quality",
    "decontamination",
    "exact_dedup",
    "near_dedup",
)


@dataclass
class ScanSettings:
    """What the stages need, sent once to every worker."""

    text_field: str = "text"
    on_bad_utf8: str = "error"
    filters: FilterOptions = field(default_factory=FilterOptions)
    dedup: bool = True
    seed: int = 0
    near: NearDedupOptions | None = None
    blocklist: Blocklist | None = None
    url_field: str = "url"
    languages: list[str] | None = None
    language_threshold: float = 0.5
    quality_model: str | None = None
    quality_threshold: float = 0.5
    pii: bool = False
    eval_index: EvalIndex | None = None


@dataclass
class DocScan:
    """One document's outcome: removed (stage, reason, match) or its keys for the merge."""

    where: str
    nbytes: int
    removed: tuple[str, str, str | None] | None = None
    key: bytes | None = None
    split_hash: int = 0
    replaced: bool = False
    pii: tuple[int, int, int] = (0, 0, 0)  # email, ip, phone


def split_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _quality_model():
    if "quality_model_obj" not in WORKER:
        from megalite.data.quality import load_quality_model

        WORKER["quality_model_obj"] = load_quality_model(WORKER["scan"].quality_model)
    return WORKER["quality_model_obj"]


def _url(doc: RawDoc, url_field: str) -> object:
    if doc.kind != "jsonl":
        return None
    try:
        obj = json.loads(doc.data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # decode() already reported or replaced what is wrong with the line
    return obj.get(url_field) if isinstance(obj, dict) else None


def scrub_text(text: str, s: ScanSettings) -> str:
    """The text that is tokenized (the PII pass, when on)."""
    if s.pii:
        from megalite.data.pii import scrub

        return scrub(text)[0]
    return text


def scan_doc(doc: RawDoc, s: ScanSettings) -> tuple[DocScan, np.ndarray | None]:
    size = len(doc.data) if doc.data is not None else 0
    out = DocScan(doc.where, size)
    text, out.replaced = decode(doc, s.text_field, s.on_bad_utf8)
    if text is None:
        out.removed = ("read", "bad_utf8", None)
        return out, None
    if s.blocklist is not None:
        hit = s.blocklist.blocked(_url(doc, s.url_field))
        if hit is not None:
            out.removed = ("blocklist", f"domain {hit[0]}", hit[1])
            return out, None
    verdict = quality_verdict(text, s.filters)
    if verdict is not None:
        out.removed = ("heuristics", verdict, None)
        return out, None
    if s.languages is not None:
        from megalite.data.quality import language

        lang, prob = language(text)
        if lang not in s.languages or prob < s.language_threshold:
            out.removed = ("language", f"{lang} {prob:.3f}", None)
            return out, None
    if s.quality_model is not None:
        from megalite.data.quality import quality_score

        score = quality_score(_quality_model(), text)
        if score < s.quality_threshold:
            out.removed = ("quality", f"score {score:.3f} < {s.quality_threshold}", None)
            return out, None
    if s.pii:
        from megalite.data.pii import scrub

        text, counts = scrub(text)
        out.pii = (counts["email"], counts["ip"], counts["phone"])
    if s.eval_index is not None:
        source = s.eval_index.match(text)
        if source is not None:
            out.removed = ("decontamination", f"{s.eval_index.ngram}-gram overlap", source)
            return out, None
    out.key = dedup_key(text) if s.dedup else None
    out.split_hash = split_hash(s.seed, doc.key)
    sig = signature(text, s.near.ngram, s.near.num_perm) if s.near is not None else None
    return out, sig


def scan_chunk(docs: list[RawDoc]) -> list[tuple[DocScan, np.ndarray | None]]:
    s: ScanSettings = WORKER["scan"]
    return [scan_doc(doc, s) for doc in docs]


def build_settings(opts: PrepareOptions) -> tuple[ScanSettings, dict, dict]:
    """The scan stages' settings (models and lists loaded, so a bad one fails before any
    work), the fingerprint of everything that changes a task's result, and the stages'
    manifest entries."""
    from megalite.data.decontam import load_blocklist, load_eval_sets
    from megalite.data.dedup import lsh_params
    from megalite.data.quality import ClassifierOptions

    near = None
    if opts.near_dedup:
        near = NearDedupOptions(
            True, opts.near_dedup_threshold, opts.near_dedup_ngram, opts.near_dedup_num_perm
        )
        near.validate()
    classifiers = ClassifierOptions(
        opts.languages, opts.language_threshold, opts.quality_model, opts.quality_threshold
    )
    classifiers.validate()
    blocklist = load_blocklist(opts.blocklist) if opts.blocklist else None
    eval_index = None
    if opts.decontaminate:
        eval_index = load_eval_sets(opts.decontaminate, opts.decontam_ngram, opts.text_field)
    settings = ScanSettings(
        text_field=opts.text_field,
        on_bad_utf8=opts.on_bad_utf8,
        filters=opts.filters,
        dedup=opts.dedup,
        seed=opts.seed,
        near=near,
        blocklist=blocklist,
        url_field=opts.url_field,
        languages=opts.languages,
        language_threshold=opts.language_threshold,
        quality_model=opts.quality_model,
        quality_threshold=opts.quality_threshold,
        pii=opts.pii,
        eval_index=eval_index,
    )
    model_sha = file_sha256(opts.quality_model) if opts.quality_model else None
    eval_sha = None
    if eval_index is not None:
        eval_sha = hashlib.sha256(
            json.dumps(sorted(eval_index.sources.items())).encode()
        ).hexdigest()
    fingerprint = {
        "format": 1,
        "text_field": opts.text_field,
        "on_bad_utf8": opts.on_bad_utf8,
        "filters": asdict(opts.filters),
        "dedup": opts.dedup,
        "seed": opts.seed,
        "near": asdict(near) if near else None,
        "blocklist": file_sha256(opts.blocklist) if opts.blocklist else None,
        "url_field": opts.url_field,
        "languages": [opts.languages, opts.language_threshold],
        "quality_model": [model_sha, opts.quality_threshold],
        "pii": opts.pii,
        "eval_sets": [eval_sha, opts.decontam_ngram],
    }
    entries = {
        "near_dedup": None
        if near is None
        else {
            "threshold": near.threshold,
            "ngram": near.ngram,
            "num_perm": near.num_perm,
            "bands_rows": list(lsh_params(near.threshold, near.num_perm)),
        },
        "languages": None
        if opts.languages is None
        else {
            "keep": opts.languages,
            "threshold": opts.language_threshold,
            "model": f"langid {importlib.metadata.version('langid')}",
        },
        "quality_model": None
        if model_sha is None
        else {
            "source": opts.quality_model,
            "sha256": model_sha,
            "threshold": opts.quality_threshold,
        },
        "blocklist": None
        if blocklist is None
        else {
            "source": opts.blocklist,
            "domains": len(blocklist.domains),
            "url_field": opts.url_field,
        },
        "decontamination": None
        if eval_index is None
        else {
            "eval_sets": opts.decontaminate,
            "ngram": eval_index.ngram,
            "eval_texts": eval_index.texts,
            "eval_texts_too_short": eval_index.too_short,
        },
    }
    return settings, fingerprint, entries


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
