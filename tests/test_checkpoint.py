"""Checkpoint writes: every rank makes its own files durable, rank 0 only the shared ones (on a
network filesystem fsync flushes the caller's writes, and one rank syncing every shard would put
the whole checkpoint behind one node's bandwidth)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2


def _save_and_record_fsyncs(rank: int, store: str, run_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.fsdp import fully_shard

    from megalite import checkpoint
    from megalite.config import ModelConfig
    from megalite.parallel.distributed import DistInfo

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    os.fsync = recording_fsync  # this worker process only
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = fully_shard(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))

        class Engine:  # what checkpoint.save needs of an engine (engine.NativeEngine's DCP save)
            checkpoint_format = "dcp"

            def save(self, directory: Path) -> None:
                checkpoint.save_dcp(model, optimizer, directory)

        checkpoint.save(run_dir, 1, Engine(), {"tokens": 0}, ModelConfig(), info, keep_last=2)
        Path(run_dir, f"fsyncs_{rank}.json").write_text(json.dumps(synced))
    finally:
        dist.destroy_process_group()


def test_each_rank_fsyncs_its_own_files_and_rank_0_the_shared_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mp.spawn(
        _save_and_record_fsyncs, args=(str(tmp_path / "store"), str(run)), nprocs=WORLD, join=True
    )
    ckpt = run / "checkpoints" / "step_00000001"
    root = run / "checkpoints"

    def rel(path: str) -> str:
        # Files are synced in step_N.tmp/, before its rename to step_N/.
        return str(Path(path).relative_to(root)).replace(".tmp", "", 1)

    synced = {
        r: {rel(p) for p in json.loads((run / f"fsyncs_{r}.json").read_text())} for r in (0, 1)
    }
    shards = {r: {f"step_00000001/{p.name}" for p in ckpt.glob(f"__{r}_*.distcp")} for r in (0, 1)}
    assert shards[0] and shards[1]
    for r in (0, 1):
        own = shards[r] | {f"step_00000001/rank_{r:05d}.pt"}
        assert own <= synced[r], (r, own - synced[r])
        assert not own & synced[1 - r], f"rank {1 - r} synced rank {r}'s files"
    shared = {"step_00000001/.metadata", "step_00000001/meta.json", "latest"}
    assert shared <= synced[0]
    assert not (shared | {"step_00000001", "."}) & synced[1]
    # Every file of the checkpoint was synced by someone.
    files = {f"step_00000001/{p.name}" for p in ckpt.iterdir()}
    assert files <= synced[0] | synced[1]
