"""What prepare removed, and `megalite-data report`.

`OUT/removed.jsonl` holds one JSON object per removed document, in input order:

    {"source": "web/part-3.jsonl:118", "stage": "near_dedup", "reason": "MinHash LSH",
     "bytes": 5120, "match": "web/part-0.jsonl:7"}

`source` is the input file (plus `:line` for JSON-lines, `:row N` for parquet), `stage` one of
scan.STAGES, `reason` the stage's detail (the failed heuristic, the language and its probability,
the classifier score, the blocked domain), `bytes` the document's size in its input, and `match`
what it was matched against: the kept document (exact / near duplicates), the evaluation text
(decontamination) or the blocklist line.

`megalite-data report OUT` renders per-stage documents and bytes (and what was kept) as a
markdown table and a horizontal bar plot (matplotlib, written to `OUT/removed.png` unless
`--plot` says where).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from megalite.data.common import DataError, read_manifest
from megalite.data.scan import STAGES

REMOVED = "removed.jsonl"
PLOT = "removed.png"


def write_removed(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def stage_totals(data_dir: str | Path) -> tuple[dict, dict, dict]:
    """(per-stage documents, per-stage bytes, the manifest), read from removed.jsonl."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    path = root / REMOVED
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} is missing; {str(root)!r} was prepared by an older megalite: "
            "prepare it again to get the removal report"
        )
    docs: Counter = Counter()
    nbytes: Counter = Counter()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                docs[r["stage"]] += 1
                nbytes[r["stage"]] += int(r.get("bytes", 0))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{lineno} is not a removal record ({e})") from e
    return dict(docs), dict(nbytes), manifest


def report(data_dir: str | Path, plot: str | Path | None = None) -> tuple[str, Path]:
    """The markdown table, and the path of the bar plot written."""
    docs, nbytes, m = stage_totals(data_dir)
    n_in = m.get("documents_in") or 0
    b_in = m.get("bytes_in") or 0
    kept_docs = m.get("documents_out") or 0
    kept_bytes = m.get("bytes_kept", max(0, b_in - sum(nbytes.values())))
    order = [s for s in STAGES if s in docs] + sorted(set(docs) - set(STAGES))

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f} %" if b else "-"

    lines = [
        "| stage | documents | % of documents | bytes | % of bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in order:
        lines.append(f"| {s} | {docs[s]:,} | {pct(docs[s], n_in)} | {nbytes[s]:,} | "
                     f"{pct(nbytes[s], b_in)} |")  # fmt: skip
    lines.append(f"| **kept** | {kept_docs:,} | {pct(kept_docs, n_in)} | {kept_bytes:,} | "
                 f"{pct(kept_bytes, b_in)} |")  # fmt: skip
    lines.append(f"| **in** | {n_in:,} | 100.0 % | {b_in:,} | 100.0 % |")
    pii = m.get("pii_replaced")
    if pii and any(pii.values()):
        lines.append("")
        lines.append("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in pii.items()))
    table = "\n".join(lines)

    out = Path(plot) if plot else Path(data_dir) / PLOT
    _bar_plot(out, order, docs, nbytes, kept_docs, kept_bytes, str(data_dir))
    return table, out


def _bar_plot(out: Path, order, docs, nbytes, kept_docs, kept_bytes, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*order, "kept"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(labels) + 1.5), sharey=True)
    for ax, values, what in (
        (axes[0], [docs[s] for s in order] + [kept_docs], "documents"),
        (axes[1], [nbytes[s] / 1e6 for s in order] + [kept_bytes / 1e6], "MB"),
    ):
        colors = ["tab:red"] * len(order) + ["tab:green"]
        ax.barh(labels, values, color=colors)
        ax.set_xlabel(what)
        ax.invert_yaxis()
    fig.suptitle(f"megalite-data prepare: removed per stage ({title})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
