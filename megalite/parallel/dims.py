"""Parallel degrees and the device mesh they describe.

The mesh is (dp_replicate, dp_shard, tp) with tp innermost, so the ranks of a tensor-parallel
group are consecutive (one node on a cluster) and the data-parallel groups stride across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megalite.config import DEEPSPEED_STRATEGIES, ParallelConfig, resolve_degrees


@dataclass(frozen=True)
class ParallelDims:
    strategy: str
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        dp_replicate, dp_shard, tp = resolve_degrees(cfg, world_size)
        return cls(cfg.strategy, dp_replicate, dp_shard, tp)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel size: how many different micro-batches one step consumes."""
        return self.dp_replicate * self.dp_shard

    @property
    def uses_fsdp(self) -> bool:
        return self.strategy in ("fsdp", "hsdp", "fsdp_tp")

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED_STRATEGIES

    def dp_rank(self, rank: int) -> int:
        """This rank's index among the data-parallel ranks (tp ranks share one)."""
        return rank // self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The mesh over all ranks; None for one process without a process group (a group the
        caller started at world size 1, as `megalite-gpu-check` does, still gets one)."""
        if self.world_size == 1 and not torch.distributed.is_initialized():
            return None
        return init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("dp_replicate", "dp_shard", "tp"),
        )
