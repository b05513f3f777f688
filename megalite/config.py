"""Typed configuration: one dataclass schema per Hydra group, registered in the ConfigStore.

Every YAML file under `conf/<group>/` starts from its schema (`defaults: [base_<group>, _self_]`),
so an unknown key or a wrong type fails when Hydra composes the config. Values are checked where
they live (`__post_init__`, which `OmegaConf.to_object` runs), and the checks that need several
groups live in `Config.__post_init__`; those that need the world size live with the degrees, in
`parallel/dims.py` (`ParallelDims.from_config`, `check_world_size`) — nowhere else.

Every error names the full key, the value received and a fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from megalite.backends import AC_MODES, ATTENTION, LOSS, NORM
from megalite.errors import ConfigError
from megalite.eval_config import EvalConfig, HarnessConfig, check_harness  # noqa: F401
from megalite.parallel.pp_schedules import check_pipeline, check_pp_fields
from megalite.strategies import MESH_DIMS, STRATEGIES


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}; pick one of them")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


# --------------------------------------------------------------------------------------- model
ROPE_SCALINGS = ("none", "llama3")
ROPE_SCALING_FIELDS = (
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_seq_len",
)


@dataclass
class ModelConfig:
    """A decoder-only Llama-style transformer. Presets: conf/model/*.yaml."""

    name: str = "debug"
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # None: as many kv heads as query heads (multi-head attention).
    n_kv_heads: int | None = None
    # None: Llama's rule, 8/3 * dim scaled by ffn_dim_multiplier and rounded up to multiple_of.
    ffn_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE frequency scaling: none, or llama3 (Llama 3.1 / 3.2 / 3.3 checkpoints: factor 8, or
    # 32 for 3.2 1B and 3B; the rule: model/layers.py llama3_scaled).
    rope_scaling: str = "none"  # none | llama3
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    # auto: sdpa and torch on every device (torch SDPA picks flash/cuDNN kernels on CUDA; compile
    # fuses the norm). megalite's Triton kernels and flash-attn are opt-in.
    attention: str = "auto"  # auto or a row of backends.ATTENTION
    norm: str = "auto"  # auto or a row of backends.NORM

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            _positive(f"model.{key}", getattr(self, key))
        _positive("model.norm_eps", self.norm_eps)
        _positive("model.rope_theta", self.rope_theta)
        _choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            for key in ROPE_SCALING_FIELDS:
                _positive(f"model.{key}", getattr(self, key))
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ConfigError(
                    f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                    f"model.rope_low_freq_factor={self.rope_low_freq_factor} (Llama 3.1: 4 and 1)"
                )
        _positive("model.init_std", self.init_std)
        if self.n_kv_heads is not None:
            _positive("model.n_kv_heads", self.n_kv_heads)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads dividing {self.dim}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                f"{self.n_kv_heads}; pick n_kv_heads dividing {self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.dim / model.n_heads = {self.head_dim} is odd; RoPE needs an even head dim"
            )
        if self.ffn_dim is not None:
            _positive("model.ffn_dim", self.ffn_dim)
        _choice(ATTENTION.key, self.attention, ATTENTION.choices)
        _choice(NORM.key, self.norm, NORM.choices)

    @property
    def rope_scaling_params(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original_max_seq_len), or None unscaled."""
        if self.rope_scaling == "none":
            return None
        return tuple(getattr(self, key) for key in ROPE_SCALING_FIELDS)  # type: ignore[return-value]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, by Llama's rule unless `ffn_dim` is given."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# ------------------------------------------------------------------------------------ parallel
# How context parallelism computes attention over a split sequence (parallel/context.py).
CP_MODES = ("ulysses", "ring")


@dataclass
class ParallelConfig:
    """How the model is spread over ranks; presets in conf/parallel/.

    Degrees multiply to the world size; one of them may be -1, meaning "the rest of the world
    size". The mesh is (dp_replicate, dp_shard, tp), tp innermost, so a tensor-parallel group
    is consecutive ranks (one node).
    """

    strategy: str = "ddp"  # a row of megalite/strategies.py
    dp_replicate: int = -1
    dp_shard: int = 1
    tp: int = 1
    # Context parallel: each sequence split cp ways over ranks that read the same samples;
    # FSDP shards over dp_shard x cp. cp_mode (parallel/context.py): ulysses (all-to-all,
    # any attention backend, any device) or ring (torch's ring attention; CUDA, attention=sdpa).
    cp: int = 1
    cp_mode: str = "ulysses"
    # Pipeline parallel (parallel/pipeline.py): pp ranks each run a slice of the layers;
    # pp_schedule is a row of parallel/pp_schedules.py (gpipe, 1f1b, interleaved_1f1b, zbv),
    # pp_virtual_stages the stages per rank (interleaved_1f1b: >= 2, zbv: 2), pp_microbatches
    # how many pipeline micro-batches each train micro-batch is split into (None: pp).
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    pp_microbatches: int | None = None
    # FSDP2: free the unsharded parameters after forward (re-gathered for backward).
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"  # one of backends.AC_MODES
    # With gradient accumulation, reduce gradients once per optimizer step instead of once per
    # micro-batch (DDP no_sync; FSDP2 holds unsharded fp32 gradients meanwhile: parameters x 4
    # bytes / tp per rank; HSDP defers only the cross-replica all-reduce). false: reduce every
    # micro-batch, for models whose unsharded gradients do not fit.
    defer_grad_sync: bool = True
    # Process-group backend: auto picks nccl on CUDA and gloo on CPU.
    backend: str = "auto"
    timeout_s: int = 600

    def __post_init__(self) -> None:
        _choice("parallel.strategy", self.strategy, tuple(STRATEGIES))
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        _choice("parallel.cp_mode", self.cp_mode, CP_MODES)
        check_pp_fields(self)
        _choice("parallel.activation_checkpointing", self.activation_checkpointing, AC_MODES)
        _positive("parallel.timeout_s", self.timeout_s)
        degrees = {key: getattr(self, key) for key in MESH_DIMS}
        for key, value in degrees.items():
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}={value} must be >= 1, or -1 for the rest")
        if sum(v == -1 for v in degrees.values()) > 1:
            raise ConfigError(
                f"parallel: only one degree may be -1, got dp_replicate={self.dp_replicate} "
                f"dp_shard={self.dp_shard} tp={self.tp} cp={self.cp}; set the others explicitly"
            )
        # The degrees the strategy keeps at 1 (`single` also takes -1: it ignores them all).
        strategy = STRATEGIES[self.strategy]
        for key in strategy.fixed_dims:
            value = degrees[key]
            if value != 1 and not (strategy.single_process and value == -1):
                hint = (
                    "DeepSpeed ZeRO does not combine with tensor parallelism; use fsdp_tp"
                    if key == "tp" and strategy.deepspeed
                    else f"set parallel.{key}=1 or pick a strategy that uses it"
                )
                raise ConfigError(
                    f"parallel.strategy={self.strategy} with parallel.{key}={value}: {hint}"
                )


# ---------------------------------------------------------------------------------------- data
# Remote schemes mosaicml-streaming downloads from (a remote without a scheme is a local path).
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "dbfs", "sftp")
SHUFFLE_ALGOS = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgtp]i?b|b)?\s*$", re.IGNORECASE)


@dataclass
class StreamConfig:
    """One source of a data mixture: a dataset made by `megalite-data prepare` (its root, with
    manifest.json, tokenizer.json, train/ and val/)."""

    # s3://bucket/path, gs://bucket/path, or a local path (e.g. a network filesystem) copied
    # into `local` as it is read. None: `local` is the dataset itself, read in place.
    remote: str | None = None
    # The dataset (no remote) or the cache a remote is streamed into; None with a remote:
    # <data.cache_dir>/<name>.
    local: str | None = None
    # Relative weight in the mixture (normalized over the streams). Give every stream one, or
    # none: then each sample of every stream is seen once per epoch.
    proportion: float | None = None
    # For logs and the default cache dir; None: the last component of the remote / local path.
    name: str | None = None

    def check(self, key: str) -> None:
        if not self.remote and not self.local:
            raise ConfigError(
                f"{key} has neither remote nor local; give remote (s3://..., gs://... or a "
                "path) and/or local (a prepared dataset dir or a cache dir)"
            )
        if self.remote and "://" in self.remote:
            scheme = self.remote.split("://", 1)[0]
            if scheme not in REMOTE_SCHEMES:
                raise ConfigError(
                    f"{key}.remote={self.remote!r} has scheme {scheme!r}, not one of "
                    f"{', '.join(REMOTE_SCHEMES)}; use one of them or a local path"
                )
        if self.proportion is not None and not self.proportion > 0:
            raise ConfigError(f"{key}.proportion={self.proportion} must be > 0")


@dataclass
class DataConfig:
    """Training data: one dataset made by `megalite-data prepare` (`dir`, read in place) or a
    mixture of `streams`, local or in object storage. Presets: conf/data/*.yaml."""

    name: str = "shakespeare"
    # A prepared dataset read in place; set it to null to use `streams` instead.
    dir: str | None = "data/shakespeare"
    streams: list[StreamConfig] = field(default_factory=list)
    # Samples are packed to seq_len + 1 tokens (inputs and shifted targets); must match the shards.
    seq_len: int = 128
    shuffle: bool = True
    # mosaicml-streaming shuffle algorithm and block size (None: its default for the node count).
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    # Fixes the global sample order for any node count; None: the node count of the first run
    # (kept in checkpoints, so resuming on another node count keeps the order).
    num_canonical_nodes: int | None = None
    # Samples per epoch of a mixture; None: the total samples of all streams.
    epoch_size: int | None = None
    num_workers: int = 0
    # Where remote streams without `local` are cached, and the byte limit of each split's cache
    # ("20gb"; None: unlimited). Evicted shards are downloaded again when needed.
    cache_dir: str = "data/cache"
    cache_limit: str | None = None
    download_timeout: float = 60.0
    # Samples to download ahead per rank; None: mosaicml-streaming's default (8 x micro-batch).
    predownload: int | None = None
    # Checks of shards read in place (remote shards are always sha1-checked as they download).
    # size: each shard's size and MDS header against index.json, at start (small reads).
    # hash: that, plus every shard's sha1 once the process group exists, each shard hashed by
    #   one rank (shards on node-local copies: each node checks only its share of its copy).
    # none: no check.
    verify_shards: str = "size"
    # Refuse data tokenized with any other tokenizer (the tokenizer_sha256 of its manifest).
    tokenizer_sha256: str | None = None
    # How `make demo` / `megalite-data prepare` builds this dataset when it is missing.
    prepare_hint: str = "megalite-data prepare shakespeare --out data/shakespeare"

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.download_timeout", self.download_timeout)
        for key in ("shuffle_block_size", "num_canonical_nodes", "epoch_size", "predownload"):
            if getattr(self, key) is not None:
                _positive(f"data.{key}", getattr(self, key))
        _choice("data.shuffle_algo", self.shuffle_algo, SHUFFLE_ALGOS)
        _choice("data.verify_shards", self.verify_shards, ("hash", "size", "none"))
        if self.cache_limit is not None and not _SIZE.match(str(self.cache_limit)):
            raise ConfigError(
                f"data.cache_limit={self.cache_limit!r} is not a size; write e.g. 20gb or 500mb"
            )
        if self.streams and self.dir:
            raise ConfigError(
                f"data.dir={self.dir!r} and data.streams are both set; set data.dir=null to "
                "train on the streams, or remove data.streams"
            )
        if not self.streams and not self.dir:
            raise ConfigError(
                "data.dir is empty; point it at a dir made by `megalite-data prepare`, or "
                "give data.streams"
            )
        for i, stream in enumerate(self.streams):
            stream.check(f"data.streams[{i}]")
        with_proportion = [s.proportion is not None for s in self.streams]
        if any(with_proportion) and not all(with_proportion):
            i = with_proportion.index(False)
            raise ConfigError(
                f"data.streams[{i}].proportion is not set but other streams have one; give "
                "every stream a proportion, or none"
            )
        remotes = [s.remote for s in self.streams if s.remote]
        locals_ = [s.local for s in self.streams if s.local]
        for what, values in (("remote", remotes), ("local", locals_)):
            dup = next((v for v in values if values.count(v) > 1), None)
            if dup is not None:
                raise ConfigError(
                    f"two data.streams have {what}={dup!r}; each stream needs its own {what}"
                )


# --------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """AdamW with per-group weight decay, and the learning-rate schedule."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Decay is off for norms and embeddings by default (they are not matrices acting on features).
    decay_norms: bool = False
    decay_embeddings: bool = False
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    # wsd: fraction of the run spent in the final (linear) decay.
    decay_fraction: float = 0.2
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _choice("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)


# --------------------------------------------------------------------------------------- train
@dataclass
class GuardConfig:
    """The loss guard: what a non-finite or spiking step does (megalite/resilience.py)."""

    # Consecutive bad steps (skipped updates) before rolling back to the last checkpoint and
    # continuing past the offending batches; 0 never rolls back (skips forever).
    max_bad_steps: int = 3
    # A loss above the running mean by spike_z standard deviations over the last spike_window
    # steps is a spike; 0 disables spike detection. spike_action: log, or skip the update.
    spike_z: float = 0.0
    spike_window: int = 100
    spike_action: str = "log"

    def __post_init__(self) -> None:
        _positive("train.guard.max_bad_steps", self.max_bad_steps, allow_zero=True)
        _positive("train.guard.spike_z", self.spike_z, allow_zero=True)
        _positive("train.guard.spike_window", self.spike_window)
        _choice("train.guard.spike_action", self.spike_action, ("log", "skip"))


FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")  # torchao's recipes (parallel/float8.py)
CKPT_ASYNC_MODES = ("none", "thread", "process")  # checkpoint_async.py


@dataclass
class TrainConfig:
    """The loop: batch shape, precision, loss backend, eval and checkpoint cadence, resume."""

    seed: int = 1234
    # The length of the whole run: the lr schedule is laid out over max_steps.
    max_steps: int = 100
    # Stop this job after this step (with a checkpoint) without changing the schedule: a run
    # split over several jobs resumes with train.resume=auto. None runs to max_steps.
    stop_at_step: int | None = None
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # Sequences per optimizer step over all ranks; None derives micro x accum x data-parallel size.
    global_batch_size: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    # bf16: autocast to bf16 over fp32 master weights; fp32: no autocast. auto (preflight
    # resolves it once, per device): bf16 on GPUs and on CPUs with native bf16 (AMX,
    # AVX512-BF16, Arm BF16), fp32 on other CPUs, where bf16 matmuls are emulated and far slower.
    precision: str = "auto"  # auto | bf16 | fp32
    # auto: the fused linear + cross-entropy kernel on CUDA (no N x V logits), torch on a CPU
    # and under tensor parallelism (loss-parallel CE over the vocab-sharded logits).
    loss: str = "auto"  # auto or a row of backends.LOSS
    compile: bool = False
    # Float8 training (torchao; megalite/parallel/float8.py): the transformer blocks' Linear
    # layers compute in float8 (never the output head). tensorwise: fastest, float8 all-gather
    # under FSDP2; rowwise: more accurate. float8_first_block / float8_last_block: convert the
    # first / last block too (false keeps it in train.precision). Needs FP8 tensor cores
    # (Ada / Hopper, MI300) on a GPU; emulated on a CPU.
    float8: str = "none"  # none | tensorwise | rowwise
    float8_first_block: bool = True
    float8_last_block: bool = True
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 20
    ckpt_every: int = 100  # 0 disables periodic checkpoints (a final one is still written)
    keep_last: int = 2
    # Asynchronous checkpoints (megalite/checkpoint_async.py): none writes in the step loop;
    # thread / process stage a copy of the state and write it in the background while training
    # goes on (at most one save in flight; a checkpoint counts once its meta.json is durable).
    # process: a helper process does the writing; the script that starts training must guard
    # its entry point (if __name__ == "__main__":), as the helper re-imports it.
    ckpt_async: str = "none"  # none | thread | process
    # none: start fresh (refuses a run_dir that already holds checkpoints); auto: newest complete
    # checkpoint in run_dir if any; or a path to a checkpoint dir.
    resume: str = "none"
    # Start from the weights of this checkpoint dir (a megalite step_N dir, or one written by
    # `megalite-convert`); optimizer, schedule and data start fresh. Ignored when resuming.
    init_from: str | None = None
    plot: bool = True
    guard: GuardConfig = field(default_factory=GuardConfig)
    # A step taking longer than this dumps all stacks and exits non-zero; 0 disables.
    watchdog_s: int = 0

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("eval_every", "eval_batches", "ckpt_every"):
            _positive(f"train.{key}", getattr(self, key), allow_zero=True)
        _positive("train.keep_last", self.keep_last)
        if self.global_batch_size is not None:
            _positive("train.global_batch_size", self.global_batch_size)
        if self.stop_at_step is not None:
            _positive("train.stop_at_step", self.stop_at_step)
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.float8", self.float8, FLOAT8_RECIPES)
        _choice("train.ckpt_async", self.ckpt_async, CKPT_ASYNC_MODES)
        _choice(LOSS.key, self.loss, LOSS.choices)
        _positive("train.watchdog_s", self.watchdog_s, allow_zero=True)
        if not self.run_dir:
            raise ConfigError("train.run_dir is empty; give a directory for checkpoints and logs")


# ------------------------------------------------------------------------------------- logging
@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "megalite"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("logging.wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    console: bool = True
    jsonl: bool = True
    # Dense bf16 peak TFLOP/s per device for MFU. None: the device table (megalite/devices.py)
    # for known GPUs, or a measured GEMM peak on CPUs and unknown devices (labeled as such in the
    # logs). On a CPU that is the best probe in the run's precision ever measured on the machine,
    # cached in $MEGALITE_CACHE_DIR (default ~/.cache/megalite/cpu_peak.json).
    peak_tflops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.peak_tflops is not None:
            _positive("logging.peak_tflops", self.peak_tflops)


# ---------------------------------------------------------------------------------------- root
@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Name of the run (experiments set it), shown in the logs and wandb.
    name: str = "default"

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len"
            )
        if self.parallel.tp > 1:
            check_tp(self, self.parallel.tp)
        if self.parallel.cp > 1:
            check_cp(self, self.parallel.cp, max(self.parallel.tp, 1))
        if self.parallel.pp > 1:
            check_pipeline(self)
        check_harness(self)
        if not self.train.resume:
            raise ConfigError("train.resume is empty; use none, auto or a checkpoint dir")


def check_tp(cfg: Config, tp: int) -> None:
    """Tensor parallelism splits heads, kv heads, the MLP and the vocabulary tp ways."""
    for key, value in (
        ("model.n_heads", cfg.model.n_heads),
        ("model.n_kv_heads", cfg.model.kv_heads),
        ("model.ffn_dim", cfg.model.hidden_dim),
        ("model.vocab_size", cfg.model.vocab_size),
    ):
        if value % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide {key}={value}; pick a tp that divides {value}"
            )
    if not LOSS.supports_tp(cfg.train.loss):
        raise ConfigError(
            f"train.loss={cfg.train.loss} does not support a vocab-sharded output layer "
            f"(parallel.tp={tp}); use train.loss=torch (loss parallel) or auto with tensor "
            "parallelism"
        )
    if not NORM.supports_tp(cfg.model.norm):
        raise ConfigError(
            f"model.norm={cfg.model.norm} does not take sequence-sharded inputs "
            f"(parallel.tp={tp}); use model.norm=torch or auto with tensor parallelism"
        )


def check_cp(cfg: Config, cp: int, tp: int) -> None:
    """Context parallelism splits every sequence cp ways (ring: 2 x cp chunks, head and tail per
    rank); Ulysses gives each rank n_heads / (tp x cp) query heads and as many kv-head groups."""
    p = cfg.parallel
    chunks = 2 * cp if p.cp_mode == "ring" else cp
    if cfg.data.seq_len % chunks:
        what = f"2 x parallel.cp = {chunks}" if p.cp_mode == "ring" else f"parallel.cp={cp}"
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by {what} "
            f"(parallel.cp_mode={p.cp_mode}); pick a data.seq_len that is a multiple of {chunks}"
        )
    if p.cp_mode == "ulysses":
        for key, value in (
            ("model.n_heads", cfg.model.n_heads),
            ("model.n_kv_heads", cfg.model.kv_heads),
        ):
            if value % (cp * tp):
                raise ConfigError(
                    f"parallel.cp={cp} x parallel.tp={tp} does not divide {key}={value} "
                    "(parallel.cp_mode=ulysses splits heads over cp x tp ranks); pick degrees "
                    f"whose product divides {value}, or parallel.cp_mode=ring on CUDA"
                )


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "logging": LoggingConfig,
}


def register_configs() -> None:
    """Registers `base_config` and one `base_<group>` schema per group in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
