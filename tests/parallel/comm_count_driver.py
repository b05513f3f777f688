"""Counts the collectives FSDP2 issues per optimizer step, inside a torchrun job. Usage:

    torchrun --standalone --nproc_per_node=2 tests/parallel/comm_count_driver.py cases.json out.json

cases.json: {"name": [overrides...], ...}. For each case every rank trains with
torch.distributed's reduce_scatter_single / all_gather_single / all_reduce wrapped by counters
(FSDP2 calls them through the module, so the wrappers see every call); rank 0 writes
{"name": {"reduce_scatter": n, "all_gather": n, "all_reduce": n, "steps": s}} to out.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch.distributed as dist

from megalite.compose import compose_config
from megalite.trainer import Trainer

COUNTED = {
    "reduce_scatter_single": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_reduce": "all_reduce",
}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counts: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counting(name):
        def wrapper(*args, **kwargs):
            counts[COUNTED[name]] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    out = {}
    try:
        for name, overrides in cases.items():
            cfg = compose_config(overrides)
            trainer = Trainer(cfg)
            counts.clear()
            for attr in COUNTED:
                setattr(dist, attr, counting(attr))
            try:
                for _ in range(cfg.train.max_steps):
                    trainer.train_step()
            finally:
                for attr, fn in originals.items():
                    setattr(dist, attr, fn)
                trainer.close()
            out[name] = dict(counts, steps=cfg.train.max_steps)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        open(sys.argv[2], "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
