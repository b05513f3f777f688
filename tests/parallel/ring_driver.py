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
from pathlib import Path

import torch.distributed as dist

import megalite.preflight as preflight
from megalite.config import Config
from megalite.parallel.context import check_cp_device
from tests.parallel import driver, ring_cpu


def main() -> None:
    ring_cpu.install()
    preflight.check_cp_device = lambda cfg, device_type, cp: check_cp_device(cfg, "cuda", cp)
    seen = dict(ring_cpu.CALLS)

    def count_ring_calls(cfg: Config) -> None:
        calls = {k: ring_cpu.CALLS[k] - seen[k] for k in seen}
        seen.update(ring_cpu.CALLS)
        if dist.get_rank() == 0:
            (Path(cfg.train.run_dir) / "ring_calls.json").write_text(json.dumps(calls))

    driver.main(after_case=count_ring_calls)


if __name__ == "__main__":
    main()
