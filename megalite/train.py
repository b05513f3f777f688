"""`megalite-train`: the Hydra entry point. compose -> typed Config -> Trainer(cfg).fit().

megalite-train experiment=cpu_demo                # the README's demo (no experiment: no recipe)
megalite-train model=llama_125m data=shakespeare train.max_steps=200
torchrun --nproc_per_node=4 -m megalite.train parallel=ddp
megalite-train --cfg job                         # print the resolved config and exit
"""

from __future__ import annotations

import importlib.util
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megalite.config import Config, ConfigError, register_configs

CONF_DIR = list(importlib.util.find_spec("megalite.conf").submodule_search_locations)[0]

register_configs()


def to_config(raw: DictConfig) -> Config:
    """The one conversion from Hydra's DictConfig to typed dataclasses (runs every __post_init__
    check). Nothing below this point sees a DictConfig."""
    try:
        return OmegaConf.to_object(raw)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from e


def compose_config(overrides: list[str]) -> Config:
    """The typed Config that `megalite-train <overrides>` would build (for notebooks, tests and
    drivers that run several configs in one process)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose("config", overrides=overrides)
    return to_config(raw)


def fail(msg: str) -> None:
    """One clear message (rank 0 only: every rank finds the same problems) and exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print("megalite-train: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def run(raw: DictConfig) -> None:
    from megalite.checkpoint import CheckpointError
    from megalite.data.prepare import DataError
    from megalite.model.layers import BackendUnavailableError

    try:
        cfg = to_config(raw)
        from megalite.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, DataError, CheckpointError, BackendUnavailableError) as e:
        fail(str(e))
    from megalite.trainer import TrainingError

    try:
        trainer.fit()
    except TrainingError as e:
        fail(str(e))


def main() -> None:
    run()


if __name__ == "__main__":
    main()
