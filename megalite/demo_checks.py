"""Warnings for a real run that still carries the CPU demo's settings: its dataset or sequence
length under a large model, or its run dir. Each is legal, so none is an error, but on an 8B
model they waste a GPU allocation without a word (1.6M tokens of Shakespeare are 0.0002 tokens
per parameter). The demo's values are read from its recipe (conf/experiment/cpu_demo.yaml), so
the recipe stays their one home. Preflight adds these to its warnings; megalite-launch prints
them before it starts anything.
"""

from __future__ import annotations

import functools
from pathlib import Path

from megalite.config import Config
from megalite.shapes import param_count

DEMO_EXPERIMENT = "cpu_demo"
# A model this large learns nothing useful from a corpus of a few million tokens (the demo's
# model has 5M parameters); smaller ones are for tests and debugging.
LARGE_PARAMS = 100_000_000


@functools.cache
def _demo() -> Config | None:
    """The demo's recipe, composed; None where the config tree has no demo (`-cd <dir>`)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from megalite.compose import compose_config, to_config

    overrides = [f"experiment={DEMO_EXPERIMENT}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside megalite-train's @hydra.main
            return to_config(compose("config", overrides=overrides))
        return compose_config(overrides)
    except Exception:  # noqa: BLE001 - a tree without the demo has nothing to compare with
        return None


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _is_demo_run_dir(run_dir: str, demo_run_dir: str) -> bool:
    # `make demo` writes runs/cpu_demo-<timestamp>; the recipe alone, runs/cpu_demo.
    run, demo = Path(run_dir).expanduser().resolve(), Path(demo_run_dir).expanduser().resolve()
    return run == demo or (run.parent == demo.parent and run.name.startswith(demo.name + "-"))


def demo_warnings(cfg: Config) -> list[str]:
    """One line per demo setting found in a config that is not the demo's."""
    demo = _demo()
    if demo is None or cfg.name == demo.name:
        return []
    found = []
    n_params = param_count(cfg.model)
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
    model = f"model {cfg.model.name} ({size} parameters"
    if n_params >= LARGE_PARAMS:
        if _same_path(cfg.data.dir, demo.data.dir):
            found.append(
                f"data.dir={cfg.data.dir} is the CPU demo's corpus (42 Shakespeare plays, about "
                f"1.6M tokens) under {model}); point data.dir "
                "at your own corpus (megalite-data prepare <texts> --out <dir>)"
            )
        if cfg.data.seq_len == demo.data.seq_len and cfg.data.seq_len < cfg.model.max_seq_len:
            found.append(
                f"data.seq_len={cfg.data.seq_len} is the CPU demo's, under {model}, "
                f"model.max_seq_len={cfg.model.max_seq_len}); set "
                "data.seq_len (and a dataset prepared at it) for a real run"
            )
    if _is_demo_run_dir(cfg.train.run_dir, demo.train.run_dir):
        found.append(
            f"train.run_dir={cfg.train.run_dir} is the CPU demo's run dir, but this run is "
            f"{cfg.name!r}; give it its own (train.run_dir=runs/{cfg.name})"
        )
    return found
