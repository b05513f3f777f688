"""What `megalite-plan` says about pipeline parallelism: the memory of each pipeline rank, the
bubble of each schedule, and a recommended (pp, dp, tp, micro-batches, AC) layout for a model on
a number of GPUs.

The recommendation is a search over layouts that fit in memory (memory.estimate_memory: the
pipeline rank that needs the most), scored by the share of peak compute left for the model:

    score = (1 - bubble) x (model FLOPs / executed FLOPs) x 0.95 ** log2(tp)

- bubble: pp_split.bubble_fraction of the schedule with m micro-batches per schedule step;
- executed FLOPs: activation checkpointing's recompute (shapes.hardware_flops_per_token);
- 5 % per doubling of tp: the exposed part of tensor parallelism's all-gather and
  reduce-scatter in every block (an assumption, within Megatron-LM's published TP scaling on
  NVLink; TP stays inside a node of 8 GPUs). FSDP's and the pipeline's communication are
  assumed overlapped with compute.

Each pipeline micro-batch is one sequence, and a schedule step takes up to 8 x pp of them (the
bubble is then below 1/8 for 1F1B); the rest of the global batch is gradient accumulation.
Ties go to the smaller tp, then the smaller pp.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megalite.backends import AC_MODES
from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.memory import MemoryEstimate, estimate_memory, pipeline_memory
from megalite.parallel.dims import ParallelDims
from megalite.parallel.pp_schedules import PP_SCHEDULES, microbatches
from megalite.parallel.pp_split import bubble_fraction
from megalite.shapes import flops_per_token, hardware_flops_per_token

GPUS_PER_NODE = 8
TP_COST_PER_DOUBLING = 0.05
MAX_CHUNKS_PER_STAGE = 8


def stage_table(cfg: Config, dims: ParallelDims) -> str:
    """Memory of each pipeline rank (GB), and the bubble of every schedule at this layout's
    micro-batch count."""
    ranks = pipeline_memory(cfg, dims)
    ac = cfg.parallel.activation_checkpointing
    lines = [
        f"per pipeline rank ({cfg.parallel.pp_schedule}, AC {ac}), GB:",
        f"{'rank':<6}{'states':>9}{'buffers':>9}{'acts':>9}{'total':>9}   stages",
    ]
    for rank, est in enumerate(ranks):
        states = est.params_gb + est.grads_gb + est.optimizer_gb
        where = est.layout.split(f"pipeline rank {rank}: ", 1)[1].split(",")[0]
        lines.append(
            f"{rank:<6}{states:>9.3g}{est.buffers_gb:>9.3g}{est.activations_gb[ac]:>9.3g}"
            f"{est.total_gb():>9.3g}   {where}"
        )
    m = microbatches(cfg)
    bubbles = []
    for name, row in PP_SCHEDULES.items():
        v = max(2, cfg.parallel.pp_virtual_stages) if row.multi_stage else 1
        bubbles.append(f"{name} {bubble_fraction(name, dims.pp, m, v):.1%}")
    lines.append(f"bubble with {m} micro-batches per step: " + ", ".join(bubbles))
    return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    schedule: str  # "-" without pipeline parallelism
    virtual: int
    chunks: int  # pipeline micro-batches (one sequence each) per schedule step
    accum: int
    ac: str
    memory: MemoryEstimate
    bubble: float
    score: float

    def describe(self, usable_gb: float) -> str:
        sched = f"{self.schedule} (v={self.virtual})" if self.virtual > 1 else self.schedule
        return (
            f"pp {self.pp} x dp {self.dp} x tp {self.tp}, {sched}, {self.chunks} micro-batches "
            f"of 1 sequence x {self.accum} accumulation, AC {self.ac}: "
            f"{self.memory.total_gb():.1f} of {usable_gb:.0f} GB, bubble {self.bubble:.1%}, "
            f"score {self.score:.3f}"
        )

    def overrides(self) -> list[str]:
        """The megalite-train overrides of this layout."""
        out = [
            "parallel=fsdp_tp",
            f"parallel.tp={self.tp}",
            f"parallel.dp_shard={self.dp}",
            f"parallel.pp={self.pp}",
            f"train.micro_batch_size={self.chunks}",
            f"train.grad_accum_steps={self.accum}",
            f"parallel.activation_checkpointing={self.ac}",
        ]
        if self.pp > 1:
            out += [
                f"parallel.pp_schedule={self.schedule}",
                f"parallel.pp_virtual_stages={self.virtual}",
                f"parallel.pp_microbatches={self.chunks}",
            ]
        return out


def _schedules(pp: int, n_layers: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("-", 1)]
    out = [("1f1b", 1)]
    if n_layers >= 2 * pp:
        out += [("interleaved_1f1b", 2), ("zbv", 2)]
    return out


def candidates(cfg: Config, n_gpus: int, usable_gb: float, global_batch: int) -> list[Candidate]:
    """Every layout of cfg's model on n_gpus that fits in usable_gb per GPU, best first.
    `global_batch`: sequences per optimizer step."""
    m = cfg.model
    base_flops = flops_per_token(m, cfg.data.seq_len)
    found = []
    for tp in (t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE and n_gpus % t == 0):
        for pp in (p for p in (1, 2, 4, 8, 16, 32) if n_gpus % (tp * p) == 0):
            dp = n_gpus // (tp * pp)
            if pp > m.n_layers or global_batch % dp:
                continue
            per_pipeline = global_batch // dp
            chunks = math.gcd(per_pipeline, MAX_CHUNKS_PER_STAGE * pp)
            if pp > 1 and chunks < pp:
                continue
            for schedule, v in _schedules(pp, m.n_layers):
                for ac in AC_MODES:
                    parallel = dataclasses.replace(
                        cfg.parallel,
                        strategy="fsdp_tp",
                        dp_replicate=1,
                        dp_shard=dp,
                        tp=tp,
                        cp=1,
                        pp=pp,
                        pp_schedule="1f1b" if pp == 1 else schedule,
                        pp_virtual_stages=v,
                        pp_microbatches=chunks if pp > 1 else None,
                        activation_checkpointing=ac,
                    )
                    train = dataclasses.replace(
                        cfg.train,
                        micro_batch_size=chunks if pp > 1 else 1,
                        grad_accum_steps=per_pipeline // (chunks if pp > 1 else 1),
                        global_batch_size=None,
                    )
                    try:
                        c = dataclasses.replace(cfg, parallel=parallel, train=train)
                        est = estimate_memory(c, ParallelDims.from_config(c.parallel, n_gpus))
                    except MegaliteError:
                        continue  # e.g. tp not dividing the heads
                    if est.total_gb() > usable_gb:
                        continue
                    bubble = bubble_fraction(schedule, pp, chunks, v) if pp > 1 else 0.0
                    useful = base_flops / hardware_flops_per_token(m, cfg.data.seq_len, ac)
                    score = (1 - bubble) * useful * (1 - TP_COST_PER_DOUBLING) ** math.log2(tp)
                    found.append(
                        Candidate(
                            tp,
                            pp,
                            dp,
                            schedule,
                            v,
                            train.micro_batch_size,
                            train.grad_accum_steps,
                            ac,
                            est,
                            bubble,
                            score,
                        )
                    )
    found.sort(key=lambda c: (-round(c.score, 6), c.tp, c.pp))
    return found


def recommend(cfg: Config, n_gpus: int, usable_gb: float, global_batch: int, top: int = 3) -> str:
    """The best layouts, with the megalite-train overrides of the first."""
    found = candidates(cfg, n_gpus, usable_gb, global_batch)
    head = (
        f"layouts for {cfg.model.name} on {n_gpus} GPUs ({usable_gb:.0f} GB usable each), global "
        f"batch {global_batch} x {cfg.data.seq_len} tokens, best first:"
    )
    if not found:
        return head + "\n  none fits: more GPUs, a shorter data.seq_len or a smaller model"
    lines = [head] + [f"  {c.describe(usable_gb)}" for c in found[:top]]
    lines.append("  megalite-train " + " ".join(found[0].overrides()))
    return "\n".join(lines)
