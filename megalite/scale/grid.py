"""`megalite-scale plan`: an IsoFLOP grid. For each compute budget C, `sizes` shapes of one
family (megalite/scale/family.py) and, for each, the steps that spend C:

    tokens D = C / flops_per_token(shape, seq_len)       (megalite's count, attention included)
    steps    = round(D / (global batch x seq_len)),  then D and C recomputed from the steps

The sizes are centred on the Chinchilla guess N = sqrt(C / (6 r)) (r = --tokens-per-param,
default 20) and spread geometrically over a factor --span in parameters, each snapped to the
nearest shape of the family that gets at least --min-steps steps; a window that runs off either
end of what the budget affords is shifted back inside. 6ND (all parameters) is written beside
megalite's count.

A grid directory:

    GRID/grid.csv                        one row per run (the table below, GRID_COLUMNS)
    GRID/plan.json                       how it was planned (budgets, family, base overrides)
    GRID/configs/experiment/<run>.yaml   each run's complete megalite config (every key)
    GRID/runs/<run>/                     each run's run dir (megalite-scale run)
    GRID/results.csv                     params,tokens,flops,loss,run_dir (megalite-scale run)

A run's config is an experiment file, so `megalite-train hydra.searchpath=[file://GRID/configs]
experiment=<run>` trains it; `run` does that (`run_overrides`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from megalite.config import Config, ModelConfig
from megalite.errors import ConfigError
from megalite.scale.family import family_shapes
from megalite.shapes import flops_per_token, param_count

GRID_COLUMNS = (
    "run",
    "budget",
    "size",
    "dim",
    "n_layers",
    "n_heads",
    "params",
    "tokens",
    "steps",
    "flops",
    "flops_6nd",
    "tokens_per_param",
)
# Keys every run's config sets itself; a base override of one of them would be silently lost.
OWNED_KEYS = ("model", "experiment", "train.max_steps", "train.run_dir", "train.resume")
CONFIG_DIR = "configs"
EXPERIMENT_DIR = "configs/experiment"


@dataclass(frozen=True)
class PlanOptions:
    budgets: list[float]
    sizes: int = 5
    family: str = "llama"
    span: float = 16.0
    tokens_per_param: float = 20.0
    min_steps: int = 50
    warmup_fraction: float = 0.05
    world_size: int = 1

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ConfigError("--budgets is empty; give FLOP budgets, e.g. --budgets 1e15,3e15")
        for b in self.budgets:
            if not (math.isfinite(b) and b > 0):
                raise ConfigError(f"--budgets has {b}; every budget must be a FLOP count > 0")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"--budgets={self.budgets} repeats a budget; give each once")
        if self.sizes < 3:
            raise ConfigError(
                f"--sizes={self.sizes}: an IsoFLOP parabola needs at least 3 sizes per budget"
            )
        if not self.span > 1:
            raise ConfigError(f"--span={self.span} must be > 1 (max/min parameters per budget)")
        if not self.tokens_per_param > 0:
            raise ConfigError(f"--tokens-per-param={self.tokens_per_param} must be > 0")
        if self.min_steps < 1:
            raise ConfigError(f"--min-steps={self.min_steps} must be >= 1")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"--warmup-fraction={self.warmup_fraction} must be in [0, 1)")
        if self.world_size < 1:
            raise ConfigError(f"--world-size={self.world_size} must be >= 1")


@dataclass(frozen=True)
class Run:
    """One row of the grid."""

    run: str
    budget: float
    size: int
    model: ModelConfig
    steps: int
    tokens: int
    flops: float

    @property
    def params(self) -> int:
        return param_count(self.model)

    def row(self) -> dict[str, object]:
        return {
            "run": self.run,
            "budget": f"{self.budget:.6g}",
            "size": self.size,
            "dim": self.model.dim,
            "n_layers": self.model.n_layers,
            "n_heads": self.model.n_heads,
            "params": self.params,
            "tokens": self.tokens,
            "steps": self.steps,
            "flops": f"{self.flops:.6g}",
            "flops_6nd": f"{6.0 * self.params * self.tokens:.6g}",
            "tokens_per_param": f"{self.tokens / self.params:.4g}",
        }


def run_name(budget: float, size: int) -> str:
    """A Hydra-safe option name: c1e12_s0, c2p5e12_s3."""
    mant, _, exp = f"{budget:.3g}".partition("e")
    label = mant.replace(".", "p") + (f"e{int(exp)}" if exp else "")
    return f"c{label}_s{size}"


def tokens_per_step(cfg: Config, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size * cfg.data.seq_len


def plan_budget(
    budget: float, shapes: list[ModelConfig], opts: PlanOptions, batch_tokens: int, seq_len: int
) -> list[Run]:
    """The IsoFLOP set of one budget (rule in the module docstring)."""
    steps = [round(budget / flops_per_token(m, seq_len) / batch_tokens) for m in shapes]
    affordable = [(m, s) for m, s in zip(shapes, steps) if s >= opts.min_steps]
    smallest = shapes[0]
    if not affordable:
        need = flops_per_token(smallest, seq_len) * opts.min_steps * batch_tokens
        raise ConfigError(
            f"budget {budget:.3g} FLOPs is too small for the smallest {opts.family} shape "
            f"(dim {smallest.dim}, {param_count(smallest):,} params): it would get "
            f"{steps[0]} steps of {batch_tokens} tokens, fewer than --min-steps="
            f"{opts.min_steps}; give budgets of at least {need:.3g} FLOPs, or lower --min-steps "
            "or the batch (train.micro_batch_size)"
        )
    if len(affordable) < 3:
        raise ConfigError(
            f"budget {budget:.3g} FLOPs affords only {len(affordable)} {opts.family} shape(s) "
            f"with at least --min-steps={opts.min_steps} steps; an IsoFLOP parabola needs 3: "
            "raise the budget or lower --min-steps"
        )
    logn = [math.log(param_count(m)) for m, _ in affordable]
    k = min(opts.sizes, len(affordable))
    centre = 0.5 * math.log(budget / (6.0 * opts.tokens_per_param))
    half = 0.5 * math.log(opts.span)
    # Shift the window inside what the budget affords, then snap each target to a shape.
    shift = max(0.0, logn[0] - (centre - half)) - max(0.0, (centre + half) - logn[-1])
    targets = [centre + shift - half + 2 * half * i / (k - 1) for i in range(k)]
    chosen: list[int] = []
    for t in targets:
        order = sorted(range(len(logn)), key=lambda i: abs(logn[i] - t))
        chosen.append(next(i for i in order if i not in chosen))
    runs = []
    for size, i in enumerate(sorted(chosen)):
        model, n_steps = affordable[i]
        tokens = n_steps * batch_tokens
        flops = flops_per_token(model, seq_len) * tokens
        runs.append(Run(run_name(budget, size), budget, size, model, n_steps, tokens, flops))
    return runs


def data_vocab(cfg: Config) -> int:
    """The dataset's vocabulary (its manifest), else the base config's model.vocab_size."""
    from megalite.data.common import read_manifest

    if cfg.data.dir and (Path(cfg.data.dir) / "manifest.json").is_file():
        return int(read_manifest(cfg.data.dir)["vocab_size"])
    return cfg.model.vocab_size


def check_base_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if any(key == k or key.startswith(k + ".") for k in OWNED_KEYS):
            raise ConfigError(
                f"base override {o!r} sets {key}, which megalite-scale plan sets for every run "
                "(the model shape, steps, run dir); leave it out (other model fields such as "
                "model.norm_eps are also set by the family)"
            )


def plan_grid(cfg: Config, opts: PlanOptions) -> list[Run]:
    """Every run of the grid, budget by budget."""
    shapes = family_shapes(opts.family, data_vocab(cfg), cfg.data.seq_len, cfg.model)
    batch_tokens = tokens_per_step(cfg, opts.world_size)
    runs: list[Run] = []
    for budget in sorted(opts.budgets):
        runs.extend(plan_budget(budget, shapes, opts, batch_tokens, cfg.data.seq_len))
    return runs


def run_config(cfg: Config, run: Run, grid_dir: Path, opts: PlanOptions) -> Config:
    """The complete config of one run: the base config with the run's shape and length.
    The final eval (mean val loss over train.eval_batches) is the run's loss; a checkpoint half
    way lets a killed run resume."""
    train = dataclasses.replace(
        cfg.train,
        max_steps=run.steps,
        global_batch_size=cfg.train.micro_batch_size * cfg.train.grad_accum_steps * opts.world_size,
        run_dir=str((grid_dir / "runs" / run.run).resolve()),
        resume="auto",
        eval_every=0,
        ckpt_every=max(1, run.steps // 2),
        keep_last=1,
        log_every=max(1, run.steps // 20),
    )
    optim = dataclasses.replace(
        cfg.optim, warmup_steps=max(1, round(opts.warmup_fraction * run.steps))
    )
    return dataclasses.replace(cfg, model=run.model, train=train, optim=optim, name=run.run)


def write_grid(cfg: Config, runs: list[Run], grid_dir: Path, opts: PlanOptions,
               base_overrides: list[str]) -> None:  # fmt: skip
    """Writes grid.csv, plan.json and one config per run; refuses a dir that already has a
    grid (its runs' results would no longer match it)."""
    grid_dir = Path(grid_dir)
    if (grid_dir / "grid.csv").exists():
        raise ConfigError(
            f"{grid_dir}/grid.csv exists; plan into a new --out dir (a grid that changes under "
            "finished runs would mix two studies)"
        )
    exp_dir = grid_dir / EXPERIMENT_DIR
    exp_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        full = run_config(cfg, run, grid_dir, opts)
        header = (
            "# @package _global_\n"
            f"# megalite-scale run {run.run}: budget {run.budget:.3g} FLOPs, "
            f"{run.params:,} params x {run.tokens:,} tokens ({run.steps} steps)\n"
            f"#   megalite-train hydra.searchpath=[file://{(grid_dir / CONFIG_DIR).resolve()}] "
            f"experiment={run.run}\n"
        )
        body = OmegaConf.to_yaml(OmegaConf.structured(full))
        (exp_dir / f"{run.run}.yaml").write_text(header + body)
    plan = {**dataclasses.asdict(opts), "base_overrides": base_overrides}
    (grid_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    with open(grid_dir / "grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GRID_COLUMNS)
        writer.writeheader()
        writer.writerows(run.row() for run in runs)


def read_grid(grid: Path) -> tuple[Path, list[dict[str, str]]]:
    """(grid dir, rows) of a grid dir or its grid.csv."""
    grid = Path(grid)
    grid_dir = grid.parent if grid.name == "grid.csv" else grid
    path = grid_dir / "grid.csv"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; make a grid with `megalite-scale plan --out DIR`"
        )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in GRID_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ConfigError(f"{path} is not a megalite-scale grid (missing {missing or 'rows'})")
    return grid_dir, rows


def run_overrides(grid_dir: Path, run: str) -> list[str]:
    """The megalite-train arguments that train one run of the grid."""
    config_dir = (Path(grid_dir) / CONFIG_DIR).resolve()
    return [f"hydra.searchpath=[file://{config_dir}]", f"experiment={run}"]
