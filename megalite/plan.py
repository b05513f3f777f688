"""`megalite-plan`: what to train with a compute budget, and whether a layout fits in memory.

    megalite-plan --gpus 1024 --gpu h100 --hours 720 --mfu 0.4
    megalite-plan --gpus 64 --gpu a100 --hours 168 --mfu 0.45 --model llama3_8b --tokens 1e12
    megalite-plan --gpus 8 --gpu h100 --hours 24 --layout fsdp_tp parallel.tp=4 \\
        train.micro_batch_size=2 parallel.activation_checkpointing=full

The arithmetic (README, "Benchmarks and planning"):

- budget: C = GPUs x dense peak FLOP/s x MFU x seconds.
- training FLOPs of N parameters on D tokens: C = 6 N D (2 FLOPs per parameter per token
  forward, 4 backward; attention and embeddings left out, as in Kaplan et al. and Hoffmann et al.).
- compute-optimal (Hoffmann et al. 2022, "Chinchilla"): D = 20 N, so N = sqrt(C / 120), D = 20 N.
  With r tokens per parameter in general: N = sqrt(C / (6 r)), D = r N. An inference-heavy plan
  takes r > 20: a smaller model (cheaper per generated token) trained on more tokens for the same
  C (Llama 2 7B was trained at ~290 tokens per parameter, Llama 3 8B at ~1900).
- wall time of a run: megalite's FLOPs per token (shapes.flops_per_token, the count its MFU
  uses) x tokens / (GPUs x peak x MFU).
- memory per rank: `memory.estimate_memory`, described there; every training run logs it at start-up
  and the measured peak after its first logged step.

Memory is in GB of 2^30 bytes, as the trainer's `mem_gb`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megalite import cli_args
from megalite.backends import AC_MODES
from megalite.config import Config, ModelConfig
from megalite.devices import (
    DEVICES,
    lookup_device,
    lookup_peak_tflops,
    resolve_precision,
)
from megalite.errors import ConfigError, MegaliteError, cli_error
from megalite.memory import estimate_memory
from megalite.parallel import pp_plan
from megalite.parallel.dims import ParallelDims, check_world_size
from megalite.shapes import checkpoint_bytes, flops_per_token, param_count

CHINCHILLA_TOKENS_PER_PARAM = 20.0
INFERENCE_TOKENS_PER_PARAM = cli_args.INFERENCE_TOKENS_PER_PARAM
# Usable share of a device's memory: the CUDA context, NCCL buffers and allocator fragmentation
# take the rest.
USABLE_FRACTION = 0.9


# ------------------------------------------------------------------------------ compute
def compute_budget(n_gpus: int, peak_tflops: float, hours: float, mfu: float) -> float:
    """FLOPs that n_gpus deliver in `hours` at `mfu` of a dense peak of `peak_tflops` each."""
    for key, value in (("gpus", n_gpus), ("peak TFLOP/s", peak_tflops), ("hours", hours)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu} must be in (0, 1]; 0.4 means 40 %")
    return n_gpus * peak_tflops * 1e12 * mfu * hours * 3600.0


def training_flops(n_params: float, tokens: float) -> float:
    """C = 6 N D."""
    return 6.0 * n_params * tokens


def compute_optimal(
    flops: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM
) -> tuple[float, float]:
    """(N parameters, D tokens) with C = 6 N D and D = tokens_per_param x N."""
    if not flops > 0 or not tokens_per_param > 0:
        raise ConfigError(f"flops={flops} and tokens_per_param={tokens_per_param} must be > 0")
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def wall_time_hours(flops: float, n_gpus: int, peak_tflops: float, mfu: float) -> float:
    """Hours to execute `flops` model FLOPs on n_gpus at `mfu` of `peak_tflops` each."""
    return flops / compute_budget(n_gpus, peak_tflops, 1.0, mfu)


# ------------------------------------------------------------------------------ models
def load_presets(conf_dir: Path | None = None) -> dict[str, ModelConfig]:
    """Every model preset of conf/model, by name."""
    from omegaconf import OmegaConf

    if conf_dir is None:
        from megalite.compose import CONF_DIR

        conf_dir = Path(CONF_DIR)
    presets = {}
    for path in sorted((conf_dir / "model").glob("*.yaml")):
        fields = OmegaConf.to_container(OmegaConf.load(path))
        fields.pop("defaults", None)
        presets[path.stem] = ModelConfig(**fields)
    return presets


def closest_preset(n_params: float, presets: dict[str, ModelConfig]) -> tuple[str, int]:
    """The preset whose parameter count is nearest to n_params on a log scale, and its count."""
    if not presets:
        raise ConfigError("no model presets to choose from (conf/model/*.yaml)")
    counts = {name: param_count(cfg) for name, cfg in presets.items()}
    name = min(counts, key=lambda k: abs(math.log(counts[k] / n_params)))
    return name, counts[name]


# ------------------------------------------------------------------------------ memory
def device_memory_gb(name: str) -> float | None:
    """Memory of a device by name: a size written in the name ("A100-SXM4-40GB") if it is a
    plausible single-GPU size, else the table's (megalite/devices.py), else None."""
    m = re.search(r"(\d+)\s*gb", name.lower())
    if m and 8 <= int(m.group(1)) <= 256:
        return float(m.group(1))
    device = lookup_device(name)
    return float(device.memory_gb) if device else None


# ------------------------------------------------------------------------------ preemption
# What `megalite-launch slurm` assumes when it sizes SLURM's warning before the time limit (its
# --ckpt-write-gbps, --grace-margin and --gpu): each node writes its share of the checkpoint at
# 1 GB/s (a 10 GbE NFS mount; Lustre or GPFS over InfiniBand often gives 5-20 GB/s per node);
# the step in flight finishes first, at 30 % MFU; a margin covers the stop handshake, the
# checkpoint's start-up and the exit; and the warning never comes later than SLURM's customary
# 120 s before the end.
CKPT_WRITE_GB_S_PER_NODE = 1.0
GRACE_MARGIN_S = 60
GRACE_FLOOR_S = 120
GRACE_MFU = 0.3


def checkpoint_save_seconds(n_params: int, nodes: int, write_gb_s_per_node: float) -> float:
    """Seconds to write one checkpoint of a model of n_params (fp32 weights and AdamW's two
    moments: shapes.checkpoint_bytes) when each of `nodes` writes its share at
    write_gb_s_per_node (10^9 bytes/s): every rank writes its own shard, all at once."""
    if not write_gb_s_per_node > 0:
        raise ConfigError(f"write bandwidth {write_gb_s_per_node} GB/s per node must be > 0")
    return checkpoint_bytes(n_params) / (nodes * write_gb_s_per_node * 1e9)


def step_seconds(cfg: Config, world_size: int, peak_tflops: float, mfu: float) -> float:
    """Seconds of one optimizer step (global batch x seq_len tokens) at `mfu` of `peak_tflops`
    per device, by megalite's FLOPs count (shapes.flops_per_token)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    tokens = check_world_size(cfg, dims) * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    return 3600.0 * wall_time_hours(flops, world_size, peak_tflops, mfu)


@dataclass(frozen=True)
class Grace:
    """How long before the time limit SLURM should warn a job, and why."""

    seconds: int
    checkpoint_gb: float  # 10^9 bytes
    save_s: float
    step_s: float | None  # None: not estimated (no GPU peak to estimate from)
    margin_s: float
    floor_s: int

    def summary(self) -> str:
        step = "" if self.step_s is None else f"step {self.step_s:.0f} s + "
        estimate = math.ceil(self.save_s + (self.step_s or 0.0) + self.margin_s)
        total = f"{estimate} s"
        if estimate < self.floor_s:
            total += f", raised to the floor of {self.floor_s} s"
        return (
            f"{step}checkpoint {self.save_s:.0f} s ({self.checkpoint_gb:,.0f} GB) + margin "
            f"{self.margin_s:.0f} s = {total}"
        )


def preemption_grace(
    cfg: Config,
    nodes: int,
    world_size: int,
    write_gb_s_per_node: float = CKPT_WRITE_GB_S_PER_NODE,
    margin_s: float = GRACE_MARGIN_S,
    floor_s: int = GRACE_FLOOR_S,
    peak_tflops: float | None = None,
    mfu: float = GRACE_MFU,
) -> Grace:
    """Seconds between SLURM's warning and the time limit that let a run of `cfg` on
    `nodes` x (world_size / nodes) ranks finish its step and write its checkpoint: the step
    (when peak_tflops is known) + the checkpoint write + a margin, at least floor_s."""
    n_params = param_count(cfg.model)
    save = checkpoint_save_seconds(n_params, nodes, write_gb_s_per_node)
    step = None if peak_tflops is None else step_seconds(cfg, world_size, peak_tflops, mfu)
    seconds = max(floor_s, math.ceil(save + (step or 0.0) + margin_s))
    return Grace(seconds, checkpoint_bytes(n_params) / 1e9, save, step, margin_s, floor_s)


# ---------------------------------------------------------------------------------- CLI
def _si(x: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _fail(msg: str) -> int:
    return cli_error("megalite-plan", MegaliteError(msg))


def main(argv: list[str] | None = None) -> int:
    args = cli_args.plan().parse_args(argv)
    device = lookup_device(args.gpu)
    peak = args.peak_tflops or (lookup_peak_tflops(args.gpu, args.precision) if device else None)
    if peak is None:
        known = ", ".join(d.key for d in DEVICES)
        why = (
            f"{args.gpu!r} has no {args.precision} peak in the table"
            if device
            else f"--gpu={args.gpu!r} is not in the peak table ({known})"
        )
        return _fail(f"{why}; pass --peak-tflops <dense {args.precision} TFLOP/s per GPU>")
    gpu_name = device.name if device else args.gpu
    try:
        budget = compute_budget(args.gpus, peak, args.hours, args.mfu)
        plans = [
            ("compute-optimal", CHINCHILLA_TOKENS_PER_PARAM),
            ("inference-heavy", args.inference_tokens_per_param),
        ]
        optimal = [(label, r, *compute_optimal(budget, r)) for label, r in plans]
    except MegaliteError as e:
        return _fail(str(e))
    presets = load_presets()

    print(
        f"megalite-plan: {args.gpus} x {gpu_name} ({peak:g} TFLOP/s dense {args.precision}) x "
        f"{args.hours:g} h at {100 * args.mfu:.0f}% MFU"
    )
    print(f"compute budget C = {budget:.3g} FLOPs (6ND)\n")
    print(f"{'plan':<17}{'tokens/param':>13}{'params N':>11}{'tokens D':>11}   closest preset")
    for label, r, n, d in optimal:
        name, count = closest_preset(n, presets)
        print(f"{label:<17}{r:>13g}{_si(n):>11}{_si(d):>11}   {name} ({_si(count)})")
    n_opt, n_inf = optimal[0][2], optimal[1][2]
    print(
        f"the inference-heavy model is {n_opt / n_inf:.2g}x smaller (so {n_opt / n_inf:.2g}x "
        f"cheaper per generated token) and sees {optimal[1][3] / optimal[0][3]:.2g}x the tokens"
    )

    model_name = args.model or closest_preset(n_opt, presets)[0]
    if model_name not in presets:
        return _fail(f"--model={model_name!r} is not a preset; pick one of {', '.join(presets)}")
    model = presets[model_name]
    seq_len = args.seq_len or min(8192, model.max_seq_len)
    try:
        from megalite.compose import compose_config
        from megalite.model.transformer import resolve_backends

        cfg = compose_config(
            [
                f"model={model_name}",
                f"parallel={args.layout}",
                f"data.seq_len={seq_len}",
                f"train.micro_batch_size={args.micro_batch}",
                *args.overrides,
            ]
        )
        # The plan is for GPUs: `auto` backends and precision resolve as they would on CUDA.
        # (Under pipeline parallelism `auto` is the torch loss on the last stage: preflight.)
        loss = "torch" if cfg.parallel.pp > 1 and cfg.train.loss == "auto" else cfg.train.loss
        model_cfg, loss = resolve_backends(cfg.model, loss, "cuda", cfg.parallel.tp)
        precision, _ = resolve_precision(cfg.train.precision, "cuda")
        train = dataclasses.replace(cfg.train, loss=loss, precision=precision)
        cfg = dataclasses.replace(cfg, model=model_cfg, train=train)
        dims = ParallelDims.from_config(cfg.parallel, args.gpus)
        est = estimate_memory(cfg, dims)
    except MegaliteError as e:
        return _fail(str(e).splitlines()[0])
    mem = args.gpu_mem_gb or device_memory_gb(args.gpu)
    print(f"\nmemory per rank: {model_name} ({_si(param_count(cfg.model))} params), {est.layout}")
    print(f"{'GB':<14}" + "".join(f"{'AC ' + ac:>15}" for ac in AC_MODES))
    rows = [
        ("params", est.params_gb),
        ("grads", est.grads_gb),
        ("optimizer", est.optimizer_gb),
        ("buffers", est.buffers_gb),
    ]
    for label, value in rows:
        print(f"{label:<14}" + f"{value:>15.3g}" * len(AC_MODES))
    print(f"{'activations':<14}" + "".join(f"{est.activations_gb[ac]:>15.3g}" for ac in AC_MODES))
    print(f"{'total':<14}" + "".join(f"{est.total_gb(ac):>15.3g}" for ac in AC_MODES))
    if mem:
        usable = USABLE_FRACTION * mem
        verdicts = ["fits" if est.total_gb(ac) <= usable else "does not fit" for ac in AC_MODES]
        print(f"{'on ' + _si(mem) + ' GB':<14}" + "".join(f"{v:>15}" for v in verdicts))
        print(f"(fits: at most {100 * USABLE_FRACTION:.0f}% of the device's {mem:g} GB)")
    else:
        print("(device memory unknown: pass --gpu-mem-gb to check the fit)")
    if dims.pp > 1:  # the total above is the pipeline rank that needs the most
        print(pp_plan.stage_table(cfg, dims))
    if args.recommend_layout and mem:
        batch = args.global_batch or max(1, 4 * 2**20 // seq_len)
        print("\n" + pp_plan.recommend(cfg, args.gpus, USABLE_FRACTION * mem, batch))

    n_model = param_count(cfg.model)
    tokens = args.tokens or CHINCHILLA_TOKENS_PER_PARAM * n_model
    run_flops = flops_per_token(cfg.model, seq_len) * tokens
    hours = wall_time_hours(run_flops, args.gpus, peak, args.mfu)
    print(
        f"\nwall time: {model_name} on {_si(tokens)} tokens ({tokens / n_model:.3g}/param) = "
        f"{run_flops:.3g} FLOPs by megalite's count at seq_len {seq_len} (6ND: "
        f"{training_flops(n_model, tokens):.3g}) -> {hours:,.1f} h ({hours / 24:.1f} days) on "
        f"{args.gpus} x {gpu_name} at {100 * args.mfu:.0f}% MFU"
    )
    print(
        f"throughput assumed: {tokens / (3600 * hours * args.gpus):,.0f} tokens/s per GPU (an "
        f"estimate from the {100 * args.mfu:.0f}% MFU, not a measurement)"
    )
    if hours > args.hours:  # say so, and what does fit: fewer tokens, or more GPUs
        gpus_needed = math.ceil(args.gpus * hours / args.hours)
        fit_tokens = tokens * args.hours / hours
        print(
            f"this does not fit the {args.hours:g} h asked ({hours / args.hours:.1f}x too long). "
            f"in {args.hours:g} h: {_si(fit_tokens)} tokens ({fit_tokens / n_model:.3g}/param, "
            f"--tokens {fit_tokens:.3g}); or {gpus_needed} GPUs ({math.ceil(gpus_needed / 8)} "
            f"nodes of 8) would train the "
            f"{_si(tokens)} tokens in {args.hours:g} h at the same MFU"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
