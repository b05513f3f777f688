"""The parallel strategies: one row per `parallel.strategy`, read everywhere else.

The config checks a strategy's degrees against its row, `ParallelDims` answers "is this FSDP /
DeepSpeed / DDP" from it, the parallelize step wraps by it, and the memory plan counts what each
row shards. A new strategy is a new row here (and a preset in conf/parallel/), not a new branch in
five modules.

Pure data: importing this module imports nothing from torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# The mesh dims, outermost first: (dp_replicate, dp_shard, cp, tp), tp innermost (one node).
# cp (context parallel) splits each sequence; FSDP shards over dp_shard x cp (parallel/context.py).
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Strategy:
    name: str
    # native: megalite's own parallelize step (FSDP2 / DDP / DTensor TP); deepspeed: a DeepSpeed
    # engine (parallel/deepspeed.py).
    engine: str
    # The mesh dims this strategy may make larger than 1; every other dim must stay 1.
    dims: tuple[str, ...]
    # FSDP2 shards parameters, gradients and optimizer state over dp_shard.
    fsdp: bool = False
    # DDP replicates the model and all-reduces gradients over dp_replicate.
    ddp: bool = False
    # DeepSpeed's ZeRO stage (1: optimizer state, 2: + gradients, 3: + parameters); 0 natively.
    zero_stage: int = 0
    description: str = ""

    @property
    def single_process(self) -> bool:
        """Runs without a process group: every degree is 1 whatever the config says."""
        return not self.dims

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def shards_state(self) -> bool:
        """Whether parameters or optimizer state are sharded over the data-parallel ranks (such
        a strategy keeps bf16 parameters for compute instead of autocast copies)."""
        return self.fsdp or self.deepspeed

    @property
    def fixed_dims(self) -> tuple[str, ...]:
        """The mesh dims that must stay 1."""
        return tuple(d for d in MESH_DIMS if d not in self.dims)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("single", "native", (), description="one process, no process group"),
        Strategy(
            "ddp", "native", ("dp_replicate",), ddp=True, description="replicated data parallel"
        ),
        Strategy(
            "fsdp", "native", ("dp_shard", "cp"), fsdp=True, description="FSDP2 (ZeRO-3 style)"
        ),
        Strategy(
            "hsdp",
            "native",
            ("dp_replicate", "dp_shard", "cp"),
            fsdp=True,
            description="FSDP2 within a group, replicated across groups",
        ),
        Strategy("tp", "native", ("tp",), description="tensor + sequence parallel alone"),
        Strategy(
            "fsdp_tp",
            "native",
            MESH_DIMS,
            fsdp=True,
            description="FSDP2 (or HSDP) over tensor + sequence parallel",
        ),
        *(
            Strategy(
                f"zero{stage}",
                "deepspeed",
                ("dp_replicate",),
                zero_stage=stage,
                description=f"DeepSpeed ZeRO stage {stage}",
            )
            for stage in (1, 2, 3)
        ),
    )
}
