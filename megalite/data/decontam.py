"""Decontamination against evaluation sets, and the URL/domain blocklist.

Decontamination: every run of `ngram` (13, as in GPT-3's and Llama's decontamination) consecutive
words of the evaluation texts is hashed (xxh64 of the normalized words: NFKC, lower case,
punctuation dropped, as near-dedup shingles); a training document sharing any of them is dropped
and listed in removed.jsonl with `match` = the evaluation text it overlaps. Evaluation texts with
fewer than `ngram` words cannot be matched and are counted (`eval_texts_too_short`).
Evaluation sets are .txt files (one text each), JSON-lines files (one text per line, in
`text_field`) or folders of them; anything else is refused naming the file.

Blocklist: a text file with one domain (`example.com`) or URL (`https://example.com/page`, its
host is used) per line; `#` starts a comment. A document whose URL (the JSON field `url_field`
of a JSON-lines input) is on a listed domain or any of its subdomains is dropped. A line that is
neither is refused naming the file and line.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from megalite.data.common import DataError

_WORD = re.compile(r"\w+")
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)+$")


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngram_hashes(text: str, n: int) -> list[int]:
    import xxhash

    w = words(text)
    return [xxhash.xxh64_intdigest(" ".join(w[i : i + n])) for i in range(len(w) - n + 1)]


@dataclass
class EvalIndex:
    """The n-gram hashes of the evaluation texts, each with the text it came from."""

    ngram: int
    sources: dict[int, str] = field(default_factory=dict)
    texts: int = 0
    too_short: int = 0

    def match(self, text: str) -> str | None:
        """The evaluation text the document shares an n-gram with, or None."""
        if not self.sources:
            return None
        for h in ngram_hashes(text, self.ngram):
            source = self.sources.get(h)
            if source is not None:
                return source
        return None


def load_eval_sets(paths: list[str], ngram: int, text_field: str = "text") -> EvalIndex:
    """Reads every evaluation text; raises DataError naming the file when one is not text."""
    from megalite.data.readers import decode, discover, iter_raw

    if ngram < 1:
        raise DataError(f"--decontam-ngram={ngram} must be >= 1 (13 is the usual choice)")
    index = EvalIndex(ngram)
    try:
        files, _ = discover(paths, text_field)
    except DataError as e:
        raise DataError(f"--decontaminate eval set: {e}") from e
    for f in files:
        if f.kind == "parquet":
            raise DataError(
                f"--decontaminate eval set {str(f.path)!r} is parquet; give .txt or .jsonl "
                "files (one text per file / line)"
            )
        with open(f.path, "rb") as fh:
            if b"\0" in fh.read(1 << 16):
                raise DataError(
                    f"--decontaminate eval set {str(f.path)!r} holds NUL bytes: it is not "
                    "text; give .txt or .jsonl files of evaluation texts"
                )
    try:
        for doc, _ in iter_raw(files, text_field):
            text, _ = decode(doc, text_field, "error")
            index.texts += 1
            hashes = ngram_hashes(text or "", ngram)
            if not hashes:
                index.too_short += 1
            for h in hashes:
                index.sources.setdefault(h, doc.where)
    except DataError as e:
        raise DataError(f"--decontaminate eval set is not text: {e}") from e
    if index.texts == 0:
        raise DataError(f"--decontaminate {paths} holds no evaluation texts")
    return index


# ------------------------------------------------------------------------------- blocklist
@dataclass
class Blocklist:
    path: str
    domains: dict[str, int]  # domain -> line

    def blocked(self, url: object) -> tuple[str, str] | None:
        """(domain, 'file:line') when the URL's host is a listed domain or below one."""
        if not isinstance(url, str) or not url:
            return None
        try:
            host = urlsplit(url if "//" in url else f"//{url}").hostname
        except ValueError:
            return None
        if not host:
            return None
        parts = host.rstrip(".").split(".")
        for i in range(len(parts) - 1):
            domain = ".".join(parts[i:])
            if domain in self.domains:
                return domain, f"{self.path}:{self.domains[domain]}"
        return None


def load_blocklist(path: str) -> Blocklist:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"--blocklist {path!r} cannot be read as UTF-8 text ({e}); give a file with one "
            "domain or URL per line"
        ) from e
    domains: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        host = entry
        if "/" in entry:
            try:
                host = urlsplit(entry if "//" in entry else f"//{entry}").hostname or ""
            except ValueError:
                host = ""
        host = host.removeprefix("*.").rstrip(".")
        if not _HOST.match(host):
            raise DataError(
                f"--blocklist {path}:{lineno}: {line.strip()!r} is not a domain (example.com) "
                "or URL (https://example.com/page); fix or remove the line (# starts a comment)"
            )
        domains.setdefault(host, lineno)
    return Blocklist(str(path), domains)
