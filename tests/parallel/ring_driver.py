"""tests/parallel/driver.py with torch's ring attention made to run on a CPU
(tests/parallel/ring_cpu.py), for `parallel.cp_mode=ring` parity on gloo. Usage:

    torchrun --standalone --nproc_per_node=N tests/parallel/ring_driver.py cases.json

Preflight refuses ring on a CPU because megalite has no CPU ring kernel; here the CPU flash
kernel stands in for the CUDA one, so the device check is run as on CUDA (its other check, the
attention backend, still applies). After each case, rank 0 writes how many ring attention
forwards and backwards ran to RUN_DIR/ring_calls.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import megalite.preflight as preflight
from megalite.compose import compose_config
from megalite.parallel.context import check_cp_device
from megalite.trainer import Trainer
from tests.parallel import ring_cpu


def main() -> None:
    ring_cpu.install()
    preflight.check_cp_device = lambda cfg, device_type, cp: check_cp_device(cfg, "cuda", cp)
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    try:
        for overrides in cases:
            cfg = compose_config(overrides)
            before = dict(ring_cpu.CALLS)
            Trainer(cfg).fit()
            if dist.get_rank() == 0:
                calls = {k: ring_cpu.CALLS[k] - before[k] for k in before}
                (Path(cfg.train.run_dir) / "ring_calls.json").write_text(json.dumps(calls))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
