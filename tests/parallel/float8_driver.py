"""Float8 training under FSDP2 inside one torchrun job (tests/test_float8.py). Usage:

    torchrun --standalone --nproc_per_node=2 tests/parallel/float8_driver.py cases.json

cases.json: a list of `megalite-train` override lists. Before each run, rank 0 writes
`<run_dir>/float8_weights.json`: {recipe: the types of the Float8Linear weights' local shards},
which shows whether FSDP2 all-gathers them in float8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torchao.float8.float8_linear import Float8Linear

from megalite.compose import compose_config
from megalite.trainer import Trainer


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    try:
        for overrides in cases:
            trainer = Trainer(compose_config(overrides))
            kinds = sorted(
                {
                    type(m.weight.to_local()).__name__
                    for m in trainer.engine.model.modules()
                    if isinstance(m, Float8Linear)
                }
            )
            if dist.get_rank() == 0:
                out = Path(trainer.cfg.train.run_dir) / "float8_weights.json"
                out.write_text(json.dumps({trainer.cfg.train.float8: kinds}))
            trainer.fit()
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
