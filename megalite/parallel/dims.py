"""Parallel degrees and the device mesh they describe.

The mesh is (dp_replicate, dp_shard, pp, cp, tp) with tp innermost, so the ranks of a
tensor-parallel group are consecutive (one node on a cluster) and the data-parallel groups stride
across them. The ranks of one pp x cp x tp block read the same samples (pp inside the
data-parallel dims keeps them consecutive, as mosaicml-streaming's replication needs); each cp
rank keeps its part of every sequence (parallel/context.py).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch.distributed
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megalite.config import Config, ParallelConfig, check_cp, check_tp
from megalite.errors import ConfigError
from megalite.strategies import STRATEGIES


@dataclass(frozen=True)
class ParallelDims:
    strategy: str
    dp_replicate: int
    dp_shard: int
    tp: int
    # Context parallel: each sequence split cp ways (last, so positional uses keep working).
    cp: int = 1
    # Pipeline parallel: pp ranks each run a slice of the layers (parallel/pipeline.py).
    pp: int = 1

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The degrees of `cfg` on `world_size` ranks, -1 filled in; their product must be the
        world size. Entry points resolve them once, here, and hand the dims down."""
        degrees = [cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.cp, cfg.pp]
        if cfg.strategy == "single":
            degrees = [1, 1, 1, 1, 1]
        known = math.prod(d for d in degrees if d != -1)
        if -1 in degrees:
            if world_size % known:
                raise ConfigError(
                    f"parallel degrees dp_replicate={cfg.dp_replicate} dp_shard={cfg.dp_shard} "
                    f"tp={cfg.tp} cp={cfg.cp} pp={cfg.pp}: the fixed ones multiply to {known}, "
                    "which does not "
                    f"divide the world size {world_size}; pick degrees dividing {world_size}"
                )
            degrees[degrees.index(-1)] = world_size // known
        if math.prod(degrees) != world_size:
            if cfg.strategy == "single":
                raise ConfigError(
                    f"parallel.strategy=single but the world size is {world_size}; "
                    "use parallel=ddp (or another multi-rank layout) under torchrun"
                )
            cp = f" x cp={degrees[3]}" if degrees[3] != 1 else ""
            cp += f" x pp={degrees[4]}" if degrees[4] != 1 else ""
            raise ConfigError(
                f"parallel degrees dp_replicate={degrees[0]} x dp_shard={degrees[1]} x tp="
                f"{degrees[2]}{cp} = {math.prod(degrees)} but the world size is {world_size}; "
                "make their product equal the number of processes (or set one of them to -1)"
            )
        return cls(cfg.strategy, *degrees)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel size: how many different micro-batches one step consumes."""
        return self.dp_replicate * self.dp_shard

    @property
    def uses_fsdp(self) -> bool:
        return STRATEGIES[self.strategy].fsdp

    @property
    def uses_ddp(self) -> bool:
        return STRATEGIES[self.strategy].ddp

    @property
    def uses_deepspeed(self) -> bool:
        return STRATEGIES[self.strategy].deepspeed

    @property
    def replication(self) -> int:
        """How many consecutive ranks read the same samples: one pp x cp x tp block."""
        return self.pp * self.cp * self.tp

    def dp_rank(self, rank: int) -> int:
        """This rank's index among the data-parallel ranks (pp, cp and tp ranks share one)."""
        return rank // self.replication

    def pp_rank(self, rank: int) -> int:
        """This rank's pipeline rank (which stages it runs)."""
        return rank // (self.cp * self.tp) % self.pp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The mesh over all ranks; None for one process without a process group (a group the
        caller started at world size 1, as `megalite-gpu-check` does, still gets one)."""
        if self.world_size == 1 and not torch.distributed.is_initialized():
            return None
        return init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.pp, self.cp, self.tp),
            mesh_dim_names=("dp_replicate", "dp_shard", "pp", "cp", "tp"),
        )


def check_world_size(cfg: Config, dims: ParallelDims) -> int:
    """Checks the config against its degrees on this world size (tensor-parallel divisibility,
    the batch arithmetic, DeepSpeed installed); returns the global batch size in sequences."""
    if dims.tp > 1:
        check_tp(cfg, dims.tp)
    if dims.cp > 1:
        check_cp(cfg, dims.cp, dims.tp)
    dp = dims.dp
    derived = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} does not equal "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x train.grad_accum_steps="
            f"{cfg.train.grad_accum_steps} x data-parallel size {dp} = {derived}; set "
            f"train.global_batch_size={derived} or change the micro-batch / accumulation"
        )
    if dims.uses_deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallel.strategy={dims.strategy} needs DeepSpeed, which is not installed; "
            "`pip install megalite[deepspeed]`, or use parallel=fsdp"
        )
    return derived
