"""Process-group setup and teardown, device selection, and every collective megalite issues.

torchrun (or srun + torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK; a plain `python` run has none of
them and is world size 1 with no process group at all (unless the caller started one, as
`megalite-gpu-check` does to exercise NCCL at world size 1).

The device rule: NCCL takes CUDA tensors only, so a collective on a CPU tensor in a GPU run fails
("No backend type associated with device type cpu") — or, through a CPU-capable backend, adds a
host sync. Every tensor collective therefore goes through `DistInfo.all_reduce`, which refuses a
tensor that is not on the run's device (the same rule on a CPU box, so tests catch it), and
scalars enter collectives through `DistInfo.tensor`, which puts them on that device.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor that is not on the group's device (a bug, not input)."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # False when the caller started the process group (then the caller also ends it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return initialized()

    # ------------------------------------------------------------------------ collectives
    def tensor(self, values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Host values as a tensor on the run's device, ready for a collective (a host-to-device
        copy: no sync)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def check_device(self, x: torch.Tensor) -> None:
        if x.device != self.device:
            raise CollectiveDeviceError(
                f"collective on a tensor on {x.device}, but this run's process group works on "
                f"{self.device}: NCCL rejects it, and any other backend adds a host sync; create "
                "it with DistInfo.tensor(...) or .to(dist_info.device)"
            )

    def all_reduce(
        self, x: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None
    ) -> torch.Tensor:
        """A reduced copy of `x` over all ranks, or over the ranks of `group` (e.g. one
        pipeline's); `x` itself at world size 1 with no group. `mean` is SUM then divide: gloo
        has no AVG."""
        self.check_device(x)
        if not initialized():
            return x
        out = x.clone()
        dist.all_reduce(out, op=REDUCE_OPS["sum" if op == "mean" else op], group=group)
        if op == "mean":
            out /= dist.get_world_size(group)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        if not initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: object) -> list[object]:
        if not initialized():
            return [obj]
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`train.device`: auto means the local GPU when CUDA is available, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "train.device=cuda but CUDA is not available here; use train.device=cpu or auto"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str, backend: str, timeout_s: int) -> DistInfo:
    """Starts the process group when launched by torchrun: nccl on CUDA, gloo on CPU. A group
    the caller already started is used as it is (rank and size from it)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, False)
    rank = int(os.environ.get("RANK", "0"))
    world = world_size_from_env()
    owns_group = False
    if world > 1:
        owns_group = True
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, device, owns_group)


def barrier() -> None:
    if initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroys the process group so no rank exits with collectives or threads still live."""
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort() -> None:
    """Tears the process group down without waiting for the other ranks (the failure path: a
    barrier here would wait for peers that may never arrive, until the group's timeout). NCCL
    communicators are aborted so peers blocked in a collective with this rank error out."""
    if not initialized():
        return
    try:
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as e:  # the group may already be broken: nothing left to release
        print(f"megalite: process group teardown after a failure: {e}", file=sys.stderr)
