"""Config composition: Hydra's config tree (`conf/`, installed as `megalite.conf`) + overrides ->
the typed `Config`. The one place a DictConfig becomes dataclasses; every command and driver
that needs a config (`megalite-train`, -launch, -plan, -bench, -gpu-check, tests) composes here.
"""

from __future__ import annotations

import importlib.util

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megalite.config import Config, register_configs
from megalite.errors import ConfigError

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
    drivers that run several configs in one process). An unknown preset or a malformed override
    is a ConfigError like any other bad value."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            raw = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from e
    return to_config(raw)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _explain(e: BaseException) -> str:
    """Hydra's message in one line, with the reason underneath it (an unknown key, a value of
    the wrong type) and, for a missing preset, the ones that exist."""
    msg = _first_line(e).rstrip(".")
    if e.__cause__ is not None:
        msg += f": {_first_line(e.__cause__)}"
    options = getattr(e, "options", None)
    if options:
        msg += "; pick one of " + ", ".join(o for o in options if not o.startswith("base_"))
    return msg
