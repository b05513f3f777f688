"""Runs several training configs one after another in one torchrun job (one process group), each
with its own environment (test machinery such as MEGALITE_FAULT is read when a Trainer starts).

    torchrun --standalone --nproc_per_node=N tests/parallel/pipeline_driver.py cases.json

cases.json: a list of {"overrides": [...megalite-train overrides...], "env": {...}}.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from megalite.compose import compose_config
from megalite.trainer import Trainer


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    try:
        for case in cases:
            saved = {k: os.environ.get(k) for k in case.get("env", {})}
            os.environ.update(case.get("env", {}))
            try:
                Trainer(compose_config(case["overrides"])).fit()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
