"""Pipeline arithmetic without torch: how the model is split into stages, which rank runs each
stage, the bubble of each schedule and how many micro-batches each stage holds at once.

The split: blocks are dealt to stages in order, contiguous, so that the most expensive stage is
as cheap as possible (an exact search over split points). A stage's cost is the training FLOPs
per token of what it runs (shapes.py's count): its blocks; the output head on the last stage
(6 V C, about one block of a 70B model, half a block of 405B); the embedding on the first
stage, counted as one forward pass over a V x C matrix (2 V C: a lookup has no matmul, but its
V x C gradient and optimizer update touch as many bytes as one). torchtitan adjusts the first and
last stages the same way, with one layer's weight each.

Notation as in pp_schedules.py: p ranks, v stages per rank, m micro-batches per schedule step.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.config import ModelConfig
from megalite.parallel.pp_schedules import PP_SCHEDULES
from megalite.shapes import block_params

EMBED = "embed"
HEAD = "head"


def block_cost(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one transformer block (the shapes.py convention)."""
    matmul = block_params(cfg) - 2 * cfg.dim  # without the two norm weights
    return 6.0 * matmul + 12.0 * cfg.dim * seq_len


def head_cost(cfg: ModelConfig) -> float:
    return 6.0 * cfg.vocab_size * cfg.dim


def embed_cost(cfg: ModelConfig) -> float:
    return 2.0 * cfg.vocab_size * cfg.dim


@dataclass(frozen=True)
class Stage:
    index: int
    rank: int  # pipeline rank (0 .. p-1) that runs it
    layers: tuple[int, ...]
    first: bool
    last: bool
    cost: float  # FLOPs per token

    def describe(self) -> str:
        parts = [EMBED] if self.first else []
        lo, hi = self.layers[0], self.layers[-1]
        parts.append(f"layers {lo}-{hi}" if hi > lo else f"layer {lo}")
        if self.last:
            parts.append(HEAD)
        return f"stage {self.index} (rank {self.rank}): " + " + ".join(parts)


def stage_ranks(pp: int, n_stages: int, style: str) -> list[int]:
    """The pipeline rank of each stage: round robin ("loop") or V-shaped ("v": rank r runs
    stages r and 2p - 1 - r)."""
    if style == "loop":
        return [s % pp for s in range(n_stages)]
    if style == "v":
        assert n_stages == 2 * pp, "the V layout has exactly two stages per rank"
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    raise ValueError(f"unknown stage layout {style!r}")


def balanced_boundaries(costs: list[float], n_stages: int, first: float, last: float) -> list[int]:
    """Split points b_0=0 < b_1 < ... < b_S = len(costs) minimizing the largest stage cost, where
    stage 0 also costs `first` and stage S-1 `last`; each stage gets at least one item. Exact
    in the largest cost (dynamic programming over the split points, pruned: 126 layers x 64
    stages in milliseconds); among splits with the same largest cost, the one with the smallest
    sum of squared stage costs (the most even one) is preferred along the way."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    scale = max(prefix[-1] + first + last, 1e-30)

    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        if abs(a[0] - b[0]) > 1e-9 * scale:
            return a[0] < b[0]
        return a[1] < b[1] - 1e-12 * scale * scale

    worst = (float("inf"), float("inf"))
    # best[s][i]: (largest stage cost, sum of squared costs) of the first i layers in s stages.
    best = [[worst] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, n_stages + 1):
        extra = (first if s == 1 else 0.0) + (last if s == n_stages else 0.0)
        for i in range(s, n - (n_stages - s) + 1):
            # Stage s takes layers j..i-1; walking j down, the stage only grows, so once it
            # alone costs more than the best split found, no smaller j can do better.
            for j in range(i - 1, s - 2, -1):
                here = prefix[i] - prefix[j] + extra
                if here > best[s][i][0] + 1e-9 * scale:
                    break
                prev = best[s - 1][j]
                value = (max(prev[0], here), prev[1] + here * here)
                if better(value, best[s][i]):
                    best[s][i], cut[s][i] = value, j
    bounds, i = [n], n
    for s in range(n_stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


def split_stages(
    cfg: ModelConfig, pp: int, virtual: int, schedule: str, seq_len: int
) -> list[Stage]:
    """The stages of `cfg` for `pp` ranks x `virtual` stages each, balanced by cost."""
    n_stages = pp * virtual
    blk, head, emb = block_cost(cfg, seq_len), head_cost(cfg), embed_cost(cfg)
    bounds = balanced_boundaries([blk] * cfg.n_layers, n_stages, emb, head)
    ranks = stage_ranks(pp, n_stages, PP_SCHEDULES[schedule].style)
    stages = []
    for s in range(n_stages):
        layers = tuple(range(bounds[s], bounds[s + 1]))
        first, last = s == 0, s == n_stages - 1
        cost = len(layers) * blk + (emb if first else 0.0) + (head if last else 0.0)
        stages.append(Stage(s, ranks[s], layers, first, last, cost))
    return stages


def describe_split(stages: list[Stage]) -> str:
    """One line per stage with its share of the work: printed at start-up."""
    worst = max(s.cost for s in stages)
    mean = sum(s.cost for s in stages) / len(stages)
    head = f"pipeline split ({len(stages)} stages, balanced by FLOPs;"
    lines = [f"{head} slowest/mean {worst / mean:.3f}):"]
    lines += [f"  {s.describe()}, {s.cost / worst:.0%} of the slowest" for s in stages]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ schedules
def bubble_fraction(schedule: str, pp: int, m: int, virtual: int = 1) -> float:
    """The share of a schedule step each rank idles, with equal stage times (the standard
    formulas): GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B (p-1)/(v m + p-1) (Narayanan et
    al. 2021); ZB-V 0 once m >= 2p, when forward, input-backward and weight-backward take equal
    time (Qi et al. 2024, sec. 6) — otherwise counted like interleaved with v = 2. The
    benchmark measures the real one (benchmarks/bench_pipeline.py)."""
    if pp == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved_1f1b":
        return (pp - 1) / (virtual * m + pp - 1)
    if schedule == "zbv":
        return 0.0 if m >= 2 * pp else (pp - 1) / (2 * m + pp - 1)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


def in_flight(schedule: str, pp: int, m: int, virtual: int, rank: int) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak, in units of one
    micro-batch through all of the rank's layers. GPipe: all m. 1F1B: p - rank (warm-up
    forwards), at most m. Interleaved 1F1B: torch's warm-up of (v-1) rounds of p plus 2 (p-1-rank)
    chunks, each 1/v of the rank's layers (p + (p-1)/v on rank 0, as Megatron-LM). ZB-V: p on
    every rank (1F1B's peak, on all ranks: the V balances them)."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, pp - rank))
    if schedule == "zbv":
        # The V gives every rank a first-half and a second-half stage: each holds about what
        # 1F1B's rank 0 holds (its paper's claim; measured in benchmarks/bench_pipeline.py).
        return float(min(m, pp))
    if schedule == "interleaved_1f1b":
        rounds = max(1, m // pp)
        per_round = m // rounds
        warmup = min((virtual - 1) * per_round + 2 * (pp - 1 - rank), virtual * m)
        return (warmup + 1) / virtual
    raise ValueError(f"unknown pipeline schedule {schedule!r}")
