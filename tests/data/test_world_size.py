"""The loader's resume guarantee, proven with real multi-rank loading: gloo process groups of
spawned processes, each rank running TrainStream over a numbered dataset (sample i is all i's).

One epoch is 48 samples; the global batch is 4 (micro-batch x ranks). A 2-rank run saves the
loader state after 5 steps, the way the trainer checkpoints, and goes on into the next epoch.
Resuming that state
- at 2 ranks gives each rank exactly the batches of the uninterrupted run;
- at 1 and at 4 ranks gives every step the same global batch, in the same order;
- at 1 rank with a global batch of 7 still consumes the rest of the epoch exactly once.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.data.conftest import free_port, sample_ids, write_numbered

SEED = 17
EPOCH = 48
SAVE_AT = 5


def _rank_main(
    rank: int, world: int, per_node: int, port: int, tmpdir: str, data: str, plan: list, out: str
):
    """One rank (of `per_node` ranks per node): runs each phase of `plan` (micro-batch, steps,
    state to load, replication) and writes its batches' sample ids to out/<world>-<rank>.json."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_WORLD_SIZE=str(per_node),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TMPDIR=tmpdir,
    )
    tempfile.tempdir = tmpdir
    import torch.distributed as dist

    from megalite.config import DataConfig
    from megalite.data.loader import TrainStream

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = DataConfig(dir=data, seq_len=8, verify_shards="none")
    records = []
    for phase in plan:
        stream = TrainStream(cfg, phase["micro"], SEED, replication=phase.get("replication", 1))
        if phase.get("load"):
            stream.load_state_dict(torch.load(phase["load"], weights_only=True))
        ids = []
        for step in range(phase["steps"]):
            x, y = next(stream)
            assert torch.equal(x[:, 1:], y[:, :-1])
            ids.append(sample_ids(x))
            if phase.get("save") and step + 1 == SAVE_AT and rank == 0:
                torch.save(stream.state_dict(), phase["save"])
        records.append(ids)
        stream.close()
        del stream
        gc.collect()
        dist.barrier()
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(records))
    dist.destroy_process_group()


def run_ranks(
    world: int, data: Path, plan: list, out: Path, per_node: int | None = None
) -> list[list[list[list[int]]]]:
    """records[rank][phase][step] = the sample ids of that rank's micro-batch."""
    per_node = per_node or world
    torch.multiprocessing.start_processes(
        _rank_main,
        args=(world, per_node, free_port(), tempfile.gettempdir(), str(data), plan, str(out)),
        nprocs=world,
        start_method="spawn",
    )
    return [json.loads((out / f"{world}-{r}.json").read_text()) for r in range(world)]


def global_batches(records: list, phase: int) -> list[list[int]]:
    """The global batch of each step in the global sample order (rank r holds every
    world-th sample, starting at r)."""
    world = len(records)
    steps = len(records[0][phase])
    return [
        [records[i % world][phase][s][i // world] for i in range(world * len(records[0][phase][s]))]
        for s in range(steps)
    ]


def in_process(data: Path, plan: list) -> list[list[list[list[int]]]]:
    """World size 1 in this process (no process group): records[0][phase][step]."""
    from megalite.config import DataConfig
    from megalite.data.loader import TrainStream

    cfg = DataConfig(dir=str(data), seq_len=8, verify_shards="none")
    records = []
    for phase in plan:
        stream = TrainStream(cfg, phase["micro"], SEED)
        if phase.get("load"):
            stream.load_state_dict(torch.load(phase["load"], weights_only=True))
        records.append([sample_ids(next(stream)[0]) for _ in range(phase["steps"])])
        stream.close()
        del stream
        gc.collect()
    return [records]


STEPS = EPOCH // 4 + 2  # one epoch at a global batch of 4, and two steps into the next


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank run: uninterrupted (saving the state after SAVE_AT steps), resumed from that
    state, and with replication=2. Returns (records, data dir, state file)."""
    root = tmp_path_factory.mktemp("world")
    data = write_numbered(root / "numbered", EPOCH)
    state = root / "state.pt"
    plan = [
        {"micro": 2, "steps": STEPS, "save": str(state)},
        {"micro": 2, "steps": STEPS - SAVE_AT, "load": str(state)},
        {"micro": 4, "steps": 3, "replication": 2},
    ]
    return run_ranks(2, data, plan, root), data, state


@pytest.mark.world_size(2)
def test_resume_across_world_sizes_loses_and_repeats_nothing(two_ranks):
    two, data, state = two_ranks
    one = in_process(
        data,
        [
            {"micro": 4, "steps": STEPS - SAVE_AT, "load": str(state)},
            {"micro": 7, "steps": (EPOCH - 4 * SAVE_AT) // 7, "load": str(state)},
            {"micro": 4, "steps": 3},
        ],
    )
    uninterrupted = global_batches(two, 0)
    epoch = [i for batch in uninterrupted[: EPOCH // 4] for i in batch]
    assert sorted(epoch) == list(range(EPOCH))  # the reference run sees each sample once
    assert uninterrupted[EPOCH // 4 :] != uninterrupted[:2]  # the next epoch is reshuffled

    # Same world size: every rank's batches are exactly those of the uninterrupted run.
    for rank in range(2):
        assert two[rank][1] == two[rank][0][SAVE_AT:]
    # One rank: the same global batches in the same order, into the next epoch.
    assert global_batches(one, 0) == uninterrupted[SAVE_AT:]
    seen_at_2 = [i for batch in uninterrupted[:SAVE_AT] for i in batch]
    resumed_at_1 = [i for batch in global_batches(one, 0)[: EPOCH // 4 - SAVE_AT] for i in batch]
    assert sorted(seen_at_2 + resumed_at_1) == list(range(EPOCH))
    # Another global batch size (7): the rest of the epoch, each sample exactly once.
    rest = [i for batch in global_batches(one, 1) for i in batch]
    assert sorted(seen_at_2 + rest) == list(range(EPOCH))
    # replication=2 (tensor parallelism): both ranks get the batches one rank would get alone.
    assert two[0][2] == two[1][2] == one[0][2]


@pytest.mark.world_size(2)
def test_two_nodes_on_one_machine_register_their_shared_memory_apart(tmp_path):
    """Two 1-rank "nodes" on one machine (as under two torchrun agents) are two local leaders:
    plain mosaicml-streaming has both create the same shared-memory prefix and fail; here each
    gets its own, and the two nodes read disjoint halves of each global batch."""
    data = write_numbered(tmp_path / "numbered", EPOCH)
    nodes = run_ranks(2, data, [{"micro": 2, "steps": EPOCH // 4}], tmp_path, per_node=1)
    epoch = [i for batch in global_batches(nodes, 0) for i in batch]
    assert sorted(epoch) == list(range(EPOCH))


@pytest.mark.slow
@pytest.mark.world_size(4)
def test_resume_at_four_ranks_continues_the_same_global_batches(two_ranks, tmp_path):
    two, data, state = two_ranks
    plan = [{"micro": 1, "steps": STEPS - SAVE_AT, "load": str(state)}]
    four = run_ranks(4, data, plan, tmp_path)
    uninterrupted = global_batches(two, 0)
    assert global_batches(four, 0) == uninterrupted[SAVE_AT:]
    seen_at_2 = [i for batch in uninterrupted[:SAVE_AT] for i in batch]
    resumed_at_4 = [i for batch in global_batches(four, 0)[: EPOCH // 4 - SAVE_AT] for i in batch]
    assert sorted(seen_at_2 + resumed_at_4) == list(range(EPOCH))


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_trainer_resumed_on_one_rank_continues_the_two_rank_losses(tiny_data, tmp_path):
    """End to end through the trainer: a 2-rank DDP run (global batch 4) checkpoints at step 3;
    resumed on 1 rank with micro-batch 4, steps 4-6 see the same samples as the uninterrupted
    2-rank run, so the fp32 losses agree (to the DDP-vs-single tolerance)."""
    from megalite.metrics import read_metrics
    from megalite.trainer import Trainer
    from tests.conftest import BIN, REPO, compose, run_cli, tiny_train_overrides

    def torchrun(run_dir, **train):
        res = run_cli(
            [
                str(REPO / "launch" / "torchrun.sh"),
                *tiny_train_overrides(tiny_data, run_dir, micro_batch_size=2, **train),
                "parallel=ddp",
            ],
            env={"NPROC": "2", "TORCHRUN": str(BIN / "torchrun"), "MAX_RESTARTS": "0"},
        )
        assert res.returncode == 0, res.stderr[-3000:]

    def losses(run_dir):
        return {
            r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r
        }

    common = dict(max_steps=6, eval_every=0, ckpt_every=3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(straight, **common)
    torchrun(split, stop_at_step=3, **common)
    Trainer(
        compose(tiny_train_overrides(tiny_data, split, micro_batch_size=4, resume="auto", **common))
    ).fit()
    gc.collect()
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a[step], b[step])
