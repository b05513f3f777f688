"""The effective tokens of each source of a data mixture: what a training run of `tokens` tokens
takes from each prepared dataset, given the mixture weights, and how many epochs of the source
that is.

A source with weight w (normalized over the mixture) gives w x tokens training tokens; its
epochs are that over the training tokens it holds (the manifest's `tokens.train`). More than one
epoch means its documents repeat; well under one, that most of it is never seen. Without
`tokens`, the run is one pass over every source (mosaicml-streaming's default epoch when no
weight is given): tokens = the sum of all sources' training tokens.

    megalite-data mixture data/shakespeare=0.7 data/mine=0.3 --tokens 2e9

`effective_tokens` takes the trainer's mixture (`data.streams`, whose `proportion` is the weight)
as (name, manifest, weight) triples, so the same table can be logged at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.data.common import DataError, read_manifest


@dataclass
class SourceShare:
    name: str
    weight: float  # normalized
    available: int  # training tokens in the source
    effective: float  # training tokens taken from it
    epochs: float


def parse_sources(items: list[str]) -> list[tuple[str, dict, float | None]]:
    """'DIR=WEIGHT' (or 'DIR': weights given to none) -> (name, manifest, weight)."""
    out = []
    for item in items:
        path, sep, weight = item.rpartition("=")
        if not sep:
            path, weight = item, ""
        try:
            w = float(weight) if weight else None
        except ValueError:
            raise DataError(f"mixture source {item!r}: weight {weight!r} is not a number") from None
        if w is not None and w <= 0:
            raise DataError(f"mixture source {item!r}: the weight must be > 0")
        out.append((path, read_manifest(path), w))
    return out


def effective_tokens(
    sources: list[tuple[str, dict, float | None]], tokens: float | None = None
) -> list[SourceShare]:
    weights = [w for _, _, w in sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError("give every mixture source a weight, or none")
    available = [int(m.get("tokens", {}).get("train", 0)) for _, m, _ in sources]
    if weights[0] is None:  # one pass over each: weights proportional to size
        weights = [float(a) for a in available]
    total_w = sum(weights)
    if total_w <= 0:
        raise DataError("the mixture's sources hold no training tokens")
    total = float(tokens) if tokens is not None else float(sum(available))
    shares = []
    for (name, _, _), w, a in zip(sources, weights, available):
        eff = total * w / total_w
        shares.append(SourceShare(name, w / total_w, a, eff, eff / a if a else float("inf")))
    return shares


def mixture_table(sources: list[tuple[str, dict, float | None]], tokens: float | None) -> str:
    shares = effective_tokens(sources, tokens)
    lines = [
        "| source | weight | training tokens | effective tokens | epochs |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in shares:
        lines.append(
            f"| {s.name} | {s.weight:.3f} | {s.available:,} | {s.effective:,.0f} | {s.epochs:.2f} |"
        )
    total = sum(s.effective for s in shares)
    lines.append(f"| **all** | 1.000 | {sum(s.available for s in shares):,} | {total:,.0f} | |")
    return "\n".join(lines)
