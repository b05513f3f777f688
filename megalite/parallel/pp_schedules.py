"""The pipeline schedules megalite runs (`parallel.pp_schedule`), one row each, and the checks of a
pipeline-parallel config that need nothing but the config.

Pure data: imports nothing from torch, so the config schema (megalite/config.py) can read it.
The stage split and the bubble arithmetic live in parallel/pp_split.py; the engine that runs a
schedule in parallel/pipeline.py.

Notation: p = parallel.pp (pipeline ranks), v = parallel.pp_virtual_stages (stages per rank),
m = pipeline micro-batches per schedule step (parallel.pp_microbatches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megalite.errors import ConfigError

if TYPE_CHECKING:
    from megalite.config import Config, ParallelConfig


@dataclass(frozen=True)
class PPSchedule:
    name: str
    # The class in torch.distributed.pipelining.schedules.
    torch_class: str
    # How stages map to ranks: "loop" puts stage s on rank s % p; "v" puts stages r and
    # 2p - 1 - r on rank r (the first and the last stage share rank 0).
    style: str
    # Stages per rank (parallel.pp_virtual_stages) the schedule accepts: [min, max].
    min_virtual: int
    max_virtual: int | None
    description: str

    @property
    def multi_stage(self) -> bool:
        """Holds several stages per rank (torch's PipelineScheduleMulti)."""
        return self.min_virtual > 1


PP_SCHEDULES: dict[str, PPSchedule] = {
    s.name: s
    for s in (
        PPSchedule(
            "gpipe",
            "ScheduleGPipe",
            "loop",
            1,
            1,
            "all forwards, then all backwards: holds every micro-batch's activations",
        ),
        PPSchedule(
            "1f1b",
            "Schedule1F1B",
            "loop",
            1,
            1,
            "one forward, one backward: the GPipe bubble with at most p micro-batches in flight",
        ),
        PPSchedule(
            "interleaved_1f1b",
            "ScheduleInterleaved1F1B",
            "loop",
            2,
            None,
            "1F1B over v stages per rank: the bubble shrinks v times, for v times the messages",
        ),
        PPSchedule(
            "zbv",
            "ScheduleZBVZeroBubble",
            "v",
            2,
            2,
            "zero-bubble V: backward split into input and weight passes that fill the bubble",
        ),
    )
}


def virtual_stages_error(schedule: str, virtual: int) -> str | None:
    """Why `parallel.pp_virtual_stages=virtual` does not suit `schedule`, or None."""
    row = PP_SCHEDULES[schedule]
    if virtual >= row.min_virtual and (row.max_virtual is None or virtual <= row.max_virtual):
        return None
    if row.max_virtual == row.min_virtual:
        need = f"exactly {row.min_virtual}"
    else:
        need = f"at least {row.min_virtual}"
    return (
        f"parallel.pp_schedule={schedule} runs {need} stage(s) per rank but "
        f"parallel.pp_virtual_stages={virtual}; set parallel.pp_virtual_stages="
        f"{row.min_virtual}" + ("" if row.multi_stage else " or use interleaved_1f1b / zbv")
    )


def check_pp_fields(par: ParallelConfig) -> None:
    """The pipeline keys of the `parallel` group on their own (ParallelConfig.__post_init__)."""
    if par.pp < 1:
        raise ConfigError(f"parallel.pp={par.pp} must be >= 1 (1: no pipeline parallelism)")
    if par.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule!r} is not one of "
            f"{', '.join(PP_SCHEDULES)}; pick one of them"
        )
    if par.pp_virtual_stages < 1:
        raise ConfigError(f"parallel.pp_virtual_stages={par.pp_virtual_stages} must be >= 1")
    if par.pp_microbatches is not None and par.pp_microbatches < 1:
        raise ConfigError(f"parallel.pp_microbatches={par.pp_microbatches} must be >= 1")
    if par.pp > 1:
        problem = virtual_stages_error(par.pp_schedule, par.pp_virtual_stages)
        if problem:
            raise ConfigError(problem)


def microbatches(cfg: Config) -> int:
    """Pipeline micro-batches per schedule step: each train micro-batch is split into this many
    (None in the config: one per pipeline rank)."""
    return cfg.parallel.pp_microbatches or cfg.parallel.pp


def check_pipeline(cfg: Config) -> None:
    """The cross-group checks of a pipeline-parallel config (parallel.pp > 1), one clear error
    each; they run when the config is built, before any process group exists."""
    par, pp = cfg.parallel, cfg.parallel.pp
    if par.strategy == "single":
        raise ConfigError(
            f"parallel.strategy=single with parallel.pp={pp}: pipeline stages run in separate "
            "processes; use parallel=pp (or fsdp / hsdp / tp / fsdp_tp with parallel.pp) under "
            "torchrun"
        )
    if par.strategy.startswith("zero"):
        raise ConfigError(
            f"parallel.strategy={par.strategy} with parallel.pp={pp}: DeepSpeed ZeRO does not "
            "combine with megalite's pipeline parallelism; use parallel=fsdp (or hsdp) with "
            f"parallel.pp={pp}, which shards like ZeRO-3"
        )
    if par.cp > 1:
        raise ConfigError(
            f"parallel.cp={par.cp} with parallel.pp={pp}: context and pipeline parallelism are "
            "not combined yet; use one of them"
        )
    stages = pp * par.pp_virtual_stages
    if cfg.model.n_layers < stages:
        raise ConfigError(
            f"parallel.pp={pp} x parallel.pp_virtual_stages={par.pp_virtual_stages} = {stages} "
            f"pipeline stages but model.n_layers={cfg.model.n_layers}: every stage needs at least "
            f"one transformer block; use at most {cfg.model.n_layers} stages"
        )
    m = microbatches(cfg)
    micro = cfg.train.micro_batch_size
    if micro % m:
        raise ConfigError(
            f"parallel.pp_microbatches={m} does not divide train.micro_batch_size={micro}: each "
            "micro-batch is split into that many pipeline micro-batches; pick a divisor of "
            f"{micro} or change train.micro_batch_size"
        )
    if m < pp:
        raise ConfigError(
            f"parallel.pp_microbatches={m} is fewer than the parallel.pp={pp} pipeline ranks: "
            f"ranks would idle most of each step; use at least {pp} (and raise "
            "train.micro_batch_size to a multiple of it)"
        )
    if cfg.model.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={pp}: the embedding (first stage) and "
            "the output layer (last stage) live on different ranks; set "
            "model.tie_embeddings=false or parallel.pp=1"
        )
    if cfg.train.float8 != "none":
        raise ConfigError(
            f"train.float8={cfg.train.float8} with parallel.pp={pp}: float8 training is not "
            "applied to pipeline stages yet; use train.float8=none, or parallel.pp=1"
        )
    if cfg.train.ckpt_async != "none":
        raise ConfigError(
            f"train.ckpt_async={cfg.train.ckpt_async} with parallel.pp={pp}: the asynchronous "
            "saver writes the optimizer groups of rank 0's stages only, so the checkpoint would "
            "not load under another layout; use train.ckpt_async=none with pipeline parallelism"
        )
    if cfg.train.loss == "fused_linear":
        raise ConfigError(
            f"train.loss=fused_linear with parallel.pp={pp}: the last pipeline stage computes "
            "the loss from its logits outside the model; use train.loss=auto or torch"
        )
