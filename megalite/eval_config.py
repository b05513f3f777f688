"""The `eval` group of the training config: downstream evals beside training (docs/eval.md).
A schema of megalite/config.py (Config.eval), kept in its own file; config.py re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megalite.errors import ConfigError

if TYPE_CHECKING:
    from megalite.config import Config


@dataclass
class HarnessConfig:
    """With `every` set, the trainer's rank 0 starts `megalite-eval watch <run_dir>`
    (megalite/eval_watch.py), a separate process that runs these lm-evaluation-harness tasks on
    each checkpoint whose step is a multiple of `every` (and on the final one) and appends the
    results to metrics.jsonl. Training never waits for it."""

    # lm_eval task, group or tag names (or paths to task YAMLs).
    tasks: list[str] = field(default_factory=list)
    every: int = 0  # steps; a multiple of train.ckpt_every. 0: no evals beside training
    num_fewshot: int | None = None  # None: each task's own default
    limit: float | None = None  # examples per task (a fraction if < 1); None: all
    include_path: str | None = None  # a directory of local task YAMLs
    batch_size: int = 8
    # Where the watcher runs the model: cpu keeps it off the training GPUs; cuda shares them
    # (or launch `megalite-eval watch` as a job of its own).
    device: str = "cpu"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16
    # The watcher's torch threads (0: torch's default) and its niceness: it yields the cores
    # to training.
    threads: int = 1
    nice: int = 10

    def __post_init__(self) -> None:
        checks = (
            ("every", self.every >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("threads", self.threads >= 0, ">= 0 (0: torch's default)"),
            ("num_fewshot", self.num_fewshot is None or self.num_fewshot >= 0, ">= 0"),
            ("limit", self.limit is None or self.limit > 0, "> 0 (a fraction if < 1)"),
            ("device", self.device in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
            ("precision", self.precision in ("fp32", "bf16"), "one of fp32, bf16"),
            ("nice", 0 <= self.nice <= 19, "in [0, 19]"),
        )
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"eval.harness.{key}={getattr(self, key)!r} must be {want}")
        if self.every and not self.tasks:
            raise ConfigError(
                f"eval.harness.every={self.every} but eval.harness.tasks is empty; name the "
                "tasks (eval.harness.tasks=[hellaswag,arc_easy]) or set eval.harness.every=0"
            )


@dataclass
class EvalConfig:
    harness: HarnessConfig = field(default_factory=HarnessConfig)


def check_harness(cfg: Config) -> None:
    """The watcher evaluates checkpoints, so it runs only at steps that have one."""
    every, ckpt_every = cfg.eval.harness.every, cfg.train.ckpt_every
    if every and (not ckpt_every or every % ckpt_every):
        raise ConfigError(
            f"eval.harness.every={every} is not a multiple of train.ckpt_every={ckpt_every}: "
            "harness evals run on checkpoints; set eval.harness.every to a multiple of "
            "train.ckpt_every"
        )
