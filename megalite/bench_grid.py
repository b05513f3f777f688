"""The `megalite-bench` grid: its typed config (conf/bench/*.yaml, schema `BenchConfig`), the
cells it expands into, which cells cannot run on this device, and the datasets the cells read.

A grid entry of `model` or `parallel` is a preset name optionally followed by overrides, e.g.
`"fsdp_tp parallel.tp=2"`. The runner (megalite/bench.py) times the cells.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from megalite.backends import AC_MODES, ATTENTION, LOSS, NORM, needing_cuda
from megalite.devices import PRECISIONS
from megalite.errors import ConfigError


# ------------------------------------------------------------------------------- config
@dataclass
class GridConfig:
    """The axes; the grid is their product, in this order."""

    model: list[str] = field(default_factory=lambda: ["debug"])
    parallel: list[str] = field(default_factory=lambda: ["single"])
    seq_len: list[int] = field(default_factory=lambda: [128])
    micro_batch: list[int] = field(default_factory=lambda: [8])
    attention: list[str] = field(default_factory=lambda: ["sdpa"])
    norm: list[str] = field(default_factory=lambda: ["torch"])
    loss: list[str] = field(default_factory=lambda: ["torch"])
    compile: list[bool] = field(default_factory=lambda: [False])
    activation_checkpointing: list[str] = field(default_factory=lambda: ["none"])


@dataclass
class BenchDataConfig:
    # A prepared dataset for every cell; "{seq_len}" in it is replaced by the cell's seq len.
    # None: prepare `inputs` at each seq len into cache_dir (once; later runs reuse it).
    dir: str | None = None
    inputs: list[str] = field(default_factory=lambda: ["shakespeare"])
    vocab_size: int = 4096
    cache_dir: str = "benchmarks/results/data"


@dataclass
class BenchConfig:
    name: str = "bench"
    grid: GridConfig = field(default_factory=GridConfig)
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    warmup_steps: int = 3
    measure_steps: int = 10
    # auto: bf16 on GPUs and CPUs with native bf16, else fp32 (megalite.devices.resolve_precision)
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # Ranks of the torchrun job of each multi-rank cell when started plainly; None: the GPU
    # count, or 2 on a CPU.
    nproc: int | None = None
    # CPU threads per process (torch.set_num_threads / OMP_NUM_THREADS); None: torch's default
    # in the driver and the cores split evenly between the ranks of a torchrun job. On a shared
    # machine fewer threads than cores avoid OpenMP spin-waiting against other work.
    cpu_threads: int | None = None
    cell_timeout_s: int = 1800
    # Dense bf16 peak per device; None: the table for known GPUs, else one GEMM probe.
    peak_tflops: float | None = None
    # megalite-train overrides for every cell (e.g. optim.lr=1e-4, a data mixture, ...).
    overrides: list[str] = field(default_factory=list)
    # None: benchmarks/results/bench-<name>-<timestamp>.
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.measure_steps < 1:
            raise ConfigError(f"measure_steps={self.measure_steps} must be >= 1")
        for key in ("nproc", "cpu_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1 (or null for auto)")
        for key, choices in (("precision", PRECISIONS), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {choices}")
        for key, choices in (
            ("attention", ATTENTION.choices),
            ("norm", NORM.choices),
            ("loss", LOSS.choices),
            ("activation_checkpointing", AC_MODES),
        ):
            for value in getattr(self.grid, key):
                if value not in choices:
                    raise ConfigError(
                        f"grid.{key} has {value!r}, not one of {', '.join(choices)}; fix the list"
                    )
        for key in ("model", "parallel", "seq_len", "micro_batch", "attention", "compile"):
            if not getattr(self.grid, key):
                raise ConfigError(f"grid.{key} is empty; give at least one value")


ConfigStore.instance().store(name="base_bench", node=BenchConfig)


def bench_conf_dir() -> Path:
    from megalite.compose import CONF_DIR

    return Path(CONF_DIR) / "bench"


def compose_bench(name: str, overrides: list[str]) -> BenchConfig:
    """The typed BenchConfig of conf/bench/<name>.yaml with Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = bench_conf_dir()
    if not (conf_dir / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in conf_dir.glob("*.yaml")))
        raise ConfigError(f"--config={name!r} is not in {conf_dir}; pick one of {known}")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return OmegaConf.to_object(compose(name, overrides=overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    except HydraException as e:  # a bad override: Hydra's message, then OmegaConf's reason
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise ConfigError(str(e).splitlines()[0].rstrip(".") + cause) from e


# -------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    model: str
    parallel: str
    seq_len: int
    micro_batch: int
    attention: str
    norm: str
    loss: str
    compile: bool
    activation_checkpointing: str

    @property
    def id(self) -> str:
        # Safe in a path and in a Hydra override value (no '=', spaces or quotes).
        text = "-".join(str(v) for v in asdict(self).values())
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)

    @property
    def multi_rank(self) -> bool:
        return self.parallel.split()[0] != "single"

    def label(self) -> str:
        model, parallel = self.model.split()[0], self.parallel.replace(" parallel.", " ")
        extra = [self.attention, self.norm, self.loss]
        extra += ["compile"] if self.compile else []
        if self.activation_checkpointing != "none":
            extra.append(f"ac={self.activation_checkpointing}")
        return f"{model} {parallel} s{self.seq_len} b{self.micro_batch} {'/'.join(extra)}"

    def overrides(self, bench: BenchConfig, data_dir: Path, run_dir: Path) -> list[str]:
        model, *model_extra = self.model.split()
        parallel, *parallel_extra = self.parallel.split()
        steps = bench.warmup_steps + bench.measure_steps
        return [
            f"model={model}",
            f"parallel={parallel}",
            *model_extra,
            *parallel_extra,
            f"model.attention={self.attention}",
            f"model.norm={self.norm}",
            f"train.loss={self.loss}",
            f"train.compile={str(self.compile).lower()}",
            f"parallel.activation_checkpointing={self.activation_checkpointing}",
            f"data.dir={data_dir}",
            f"data.seq_len={self.seq_len}",
            f"train.micro_batch_size={self.micro_batch}",
            "train.grad_accum_steps=1",
            f"train.precision={bench.precision}",
            f"train.device={bench.device}",
            f"train.max_steps={steps}",
            f"train.run_dir={run_dir}",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.plot=false",
            "logging.console=false",
            "logging.jsonl=false",
            "logging.wandb.mode=disabled",
            *bench.overrides,
        ]


def expand(grid: GridConfig) -> list[Cell]:
    axes = [
        grid.model,
        grid.parallel,
        grid.seq_len,
        grid.micro_batch,
        grid.attention,
        grid.norm,
        grid.loss,
        grid.compile,
        grid.activation_checkpointing,
    ]
    return [Cell(*values) for values in itertools.product(*axes)]


def skip_reason(cell: Cell, device_type: str) -> str | None:
    """Why a cell cannot run on this device, before trying (kernels that need a GPU)."""
    # On CUDA a missing package shows up as BackendUnavailableError when building.
    found = needing_cuda(cell.attention, cell.norm, cell.loss, device_type)
    if not found:
        return None
    choice, value, why = found[0]
    return f"{choice.key}={value} {why}"


# ---------------------------------------------------------------------------------- data
def data_dir_for(bench: BenchConfig, seq_len: int) -> Path:
    if bench.data.dir is not None:
        return Path(bench.data.dir.replace("{seq_len}", str(seq_len)))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", "-".join(Path(i).name for i in bench.data.inputs))
    return Path(bench.data.cache_dir) / f"{slug[:60]}-v{bench.data.vocab_size}-s{seq_len}"


def ensure_data(bench: BenchConfig, seq_lens: list[int]) -> dict[int, Path]:
    """The dataset of every seq len, prepared if missing (all with the first one's tokenizer)."""
    from megalite.data.prepare import PrepareOptions, prepare

    dirs = {s: data_dir_for(bench, s) for s in sorted(set(seq_lens))}
    if bench.data.dir is not None:
        return dirs
    ready = [d for d in dirs.values() if (d / "manifest.json").is_file()]
    tokenizer = ready[0] / "tokenizer.json" if ready else None
    for seq_len, path in dirs.items():
        if (path / "manifest.json").is_file():
            continue
        print(f"megalite-bench: preparing {bench.data.inputs} at seq_len {seq_len} -> {path}")
        prepare(
            PrepareOptions(
                inputs=list(bench.data.inputs),
                out=str(path),
                seq_len=seq_len,
                vocab_size=bench.data.vocab_size,
                tokenizer=str(tokenizer) if tokenizer else None,
                progress=False,
            )
        )
        tokenizer = tokenizer or path / "tokenizer.json"
    return dirs
