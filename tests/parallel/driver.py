"""Runs several training configs one after another inside one torchrun job (one process group),
so a test pays the start-up of a multi-rank job once. Usage:

    torchrun --standalone --nproc_per_node=N tests/parallel/driver.py cases.json

cases.json: a list of override lists, each a full `megalite-train` command line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch.distributed as dist

from megalite.compose import compose_config
from megalite.config import Config
from megalite.trainer import Trainer


def main(after_case: Callable[[Config], None] | None = None) -> None:
    """Runs every case; `after_case(cfg)`, if given, after each one's training, on every rank."""
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    try:
        for overrides in cases:
            cfg = compose_config(overrides)
            Trainer(cfg).fit()
            if after_case is not None:
                after_case(cfg)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
