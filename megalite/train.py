"""`megalite-train`: the Hydra entry point. compose -> typed Config -> Trainer(cfg).fit().

megalite-train experiment=cpu_demo                # the README's demo (no experiment: no recipe)
megalite-train model=llama_125m data=shakespeare train.max_steps=200
torchrun --nproc_per_node=4 -m megalite.train parallel=ddp
megalite-train --cfg job                         # print the resolved config and exit
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from megalite.compose import CONF_DIR, to_config
from megalite.errors import MegaliteError


def fail(msg: str) -> None:
    """One clear message (rank 0 only: every rank finds the same problems) and exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print("megalite-train: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def run(raw: DictConfig) -> None:
    try:
        cfg = to_config(raw)
        from megalite.trainer import Trainer

        trainer = Trainer(cfg)
    except MegaliteError as e:
        fail(str(e))
    try:
        trainer.fit()
    except MegaliteError as e:
        fail(str(e))


def main() -> None:
    run()


if __name__ == "__main__":
    main()
