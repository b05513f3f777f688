"""The per-rank memory estimate of a training configuration: what `megalite-plan` prints for a
layout, what every training run logs at start-up (and the measured peak next to it after its first
logged step), and what the benchmark runner records beside each cell's measured peak.

Memory is in GB of 2^30 bytes, as the trainer's `mem_gb`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megalite.backends import AC_MODES
from megalite.config import Config, ModelConfig
from megalite.errors import ConfigError
from megalite.parallel.dims import ParallelDims
from megalite.parallel.pp_schedules import microbatches
from megalite.parallel.pp_split import in_flight, split_stages
from megalite.shapes import (
    ADAM_BYTES,
    GRAD_BYTES,
    WEIGHT_BYTES,
    block_params,
    head_params,
    matmul_params,
    param_count,
)
from megalite.strategies import STRATEGIES

GB = 2**30

# Bytes that autograd keeps per token between forward and backward, measured on megalite's model
# (reference RMSNorm, which saves fp32 copies; SDPA, which saves q, k, v, the output and a
# log-sum-exp per head) and checked against saved_tensors_hooks in tests/test_memory.py.
# Modes: fp32 training; "autocast" (bf16 autocast over fp32 weights: single, ddp, tp); "bf16"
# (bf16 parameters: FSDP2's MixedPrecisionPolicy, DeepSpeed). Coefficients of (C, K, F, H) =
# (dim, kv_heads * head_dim, ffn hidden, n_heads), plus a constant.
_LAYER = {"fp32": (32, 8, 16, 4, 8), "autocast": (30, 4, 8, 4, 8), "bf16": (24, 4, 8, 4, 8)}
# Selective checkpointing keeps the block input, every matmul output and the attention outputs.
_LAYER_SELECTIVE = {
    "fp32": (20, 8, 8, 4, 0),
    "autocast": (12, 4, 4, 4, 0),
    "bf16": (10, 4, 4, 4, 0),
}
# Full checkpointing keeps only the block input (the residual stream: bf16 only under bf16
# parameters).
_RESIDUAL = {"fp32": 4, "autocast": 4, "bf16": 2}
# Final norm, the output layer's input, fp32 logits for the loss, and the tokens and targets
# (int64): coefficients of (C, V) and a constant.
_HEAD = {"fp32": (12, 4, 20), "autocast": (10, 4, 20), "bf16": (10, 4, 20)}
# The logits' gradient, live with every activation at the start of backward (fp32, plus its bf16
# cast for the output matmul).
_LOGITS_GRAD = {"fp32": 4, "autocast": 6, "bf16": 6}


def precision_mode(cfg: Config) -> str:
    """fp32, autocast (bf16 compute over fp32 weights) or bf16 (bf16 parameters). An unresolved
    `auto` counts as bf16, as it resolves on a GPU (preflight resolves it for the device)."""
    if cfg.train.precision == "fp32":
        return "fp32"
    return "bf16" if STRATEGIES[cfg.parallel.strategy].shards_state else "autocast"


def activation_bytes(
    cfg: ModelConfig,
    tokens: int,
    mode: str,
    activation_checkpointing: str = "none",
    fused_loss: bool = False,
    logits_grad: bool = True,
) -> float:
    """Peak activation bytes of one micro-batch of `tokens` tokens on one device (no tensor
    parallelism), at the start of backward: what autograd saved, plus (logits_grad) the logits'
    gradient. With checkpointing, one block's activations are rebuilt at a time in backward, so
    one full block counts on top of what is kept."""
    if activation_checkpointing not in AC_MODES:
        raise ConfigError(
            f"parallel.activation_checkpointing={activation_checkpointing!r} is not one of "
            f"{', '.join(AC_MODES)}"
        )
    c, k = cfg.dim, cfg.kv_heads * cfg.head_dim
    f, h, v = cfg.hidden_dim, cfg.n_heads, cfg.vocab_size

    def per_layer(coef: tuple[int, int, int, int, int]) -> float:
        return coef[0] * c + coef[1] * k + coef[2] * f + coef[3] * h + coef[4]

    full_layer = per_layer(_LAYER[mode])
    if activation_checkpointing == "none":
        layers = cfg.n_layers * full_layer
    elif activation_checkpointing == "selective":
        layers = cfg.n_layers * per_layer(_LAYER_SELECTIVE[mode]) + full_layer
    else:
        layers = cfg.n_layers * _RESIDUAL[mode] * c + full_layer
    head_c, head_v, head_const = _HEAD[mode]
    # The fused linear + cross-entropy loss never materializes the logits.
    logits = 0 if fused_loss else (head_v + (_LOGITS_GRAD[mode] if logits_grad else 0)) * v
    return tokens * (layers + head_c * c + head_const + logits)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank memory of a training configuration, GB (2^30 bytes)."""

    params_gb: float
    grads_gb: float
    optimizer_gb: float
    # Autocast's bf16 weight copies, DDP's gradient buckets, FSDP's unsharded units and
    # gradients.
    buffers_gb: float
    activations_gb: dict[str, float]  # per activation_checkpointing mode
    activation_checkpointing: str  # the configured mode
    layout: str

    def total_gb(self, activation_checkpointing: str | None = None) -> float:
        ac = activation_checkpointing or self.activation_checkpointing
        states = self.params_gb + self.grads_gb + self.optimizer_gb
        return states + self.buffers_gb + self.activations_gb[ac]

    def summary(self) -> str:
        ac = self.activation_checkpointing
        return (
            f"memory plan per rank ({self.layout}): params {_size(self.params_gb)} + grads "
            f"{_size(self.grads_gb)} + optimizer {_size(self.optimizer_gb)} + buffers "
            f"{_size(self.buffers_gb)} + activations {_size(self.activations_gb[ac])} "
            f"(checkpointing {ac}) = {_size(self.total_gb())}"
        )

    def compare(self, measured_gb: float, device: torch.device) -> str:
        """The measured peak next to the plan, saying what the measurement holds."""
        what = (
            "torch.cuda.max_memory_allocated; the CUDA context and the allocator's cache come "
            "on top"
            if device.type == "cuda"
            else "on a CPU the measured peak is the whole process's RSS, including the Python "
            "and torch runtime and the data loader"
        )
        planned = self.total_gb()
        return (
            f"memory: measured peak {_size(measured_gb)} per rank vs planned {_size(planned)} "
            f"(x{measured_gb / planned:.3g}; {what})"
        )


def _size(gb: float) -> str:
    mb = gb * 1024
    return f"{mb:.3g} MB" if mb < 999.5 else f"{gb:.3g} GB"


def estimate_memory(cfg: Config, dims: ParallelDims) -> MemoryEstimate:
    """Per-rank memory of training `cfg` on the layout `dims`.

    States (fp32 master weights, fp32 gradients and two fp32 AdamW moments: 4 + 4 + 8 bytes per
    parameter), divided by what shards them: tp for every layout; dp_shard x cp for FSDP2 layouts;
    for DeepSpeed ZeRO-1/2/3 the data-parallel size for the optimizer / + gradients / +
    parameters (under bf16 DeepSpeed keeps bf16 parameters and gradients in the model, and fp32
    master weights and gradient partitions with the optimizer).

    Buffers: autocast keeps bf16 copies of the matmul weights from forward to backward; DDP copies
    gradients into its buckets. FSDP2 (the units of parallel/fsdp.py) holds whole, in the compute
    dtype, at the start of backward: the [norm, output] unit and the last block, which skip
    resharding after forward, and the next block, prefetched for backward; the embedding's unit
    was resharded after forward (tied, the root holds the tied matrix and the norm instead: the
    same count). Next to them, the unsharded fp32 gradient of the unit being reduce-scattered
    (the output layer's, the largest, goes first); under gradient accumulation with
    `parallel.defer_grad_sync`, every parameter's unsharded fp32 gradient instead, held until the
    last micro-batch (HSDP reduce-scatters every micro-batch and defers only the all-reduce, so
    its gradients stay sharded).

    Activations: `activation_bytes` for micro_batch_size x seq_len tokens, divided by tp
    (sequence parallelism shards the rest) and by cp (context parallelism); the logits count
    unless train.loss is fused_linear (resolve `auto` backends first). Not counted:
    communication buckets of DeepSpeed and NCCL, torch.compile's changes to what is saved, and
    the Triton norm (which saves less than the reference norm: the plan is then an upper bound).
    """
    if dims.pp > 1:  # the pipeline rank that needs the most (pipeline_memory)
        return max(pipeline_memory(cfg, dims), key=lambda e: e.total_gb())
    m = cfg.model
    strategy = STRATEGIES[dims.strategy]
    tp = dims.tp
    mode = precision_mode(cfg)
    p = float(param_count(m))
    block = float(block_params(m))
    pbytes = 4 if mode == "fp32" else 2  # parameters as the model computes with them

    buffers = 0.0
    if strategy.deepspeed:
        dp = dims.dp
        stage = strategy.zero_stage
        params = pbytes * p / (dp if stage >= 3 else 1)
        grads = pbytes * p / (dp if stage >= 2 else 1)
        optimizer = ADAM_BYTES * p / dp
        if mode != "fp32":
            grads += GRAD_BYTES * p / dp  # fp32 gradient partition
            optimizer += WEIGHT_BYTES * p / dp  # fp32 master weights
    else:
        # FSDP shards over dp_shard x cp (parallel/context.py).
        shard = tp * (dims.dp_shard * dims.cp if strategy.fsdp else 1)
        params = WEIGHT_BYTES * p / shard
        grads = GRAD_BYTES * p / shard
        optimizer = ADAM_BYTES * p / shard
        if strategy.fsdp:
            head = float(head_params(m))
            deferred = (
                cfg.parallel.defer_grad_sync
                and cfg.train.grad_accum_steps > 1
                and dims.dp_replicate == 1
            )
            unsharded_grads = GRAD_BYTES * (p if deferred else max(head, block))
            buffers = ((head + 2 * block) * pbytes + unsharded_grads) / tp
        else:
            if mode == "autocast":
                buffers += 2 * matmul_params(m) / tp
            if strategy.ddp and dims.dp_replicate > 1:
                buffers += GRAD_BYTES * p / tp
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    fused = cfg.train.loss == "fused_linear"
    # Context parallelism keeps 1/cp of every sequence per rank; Ulysses attention saves the
    # whole sequence for 1/cp of the heads: the same bytes.
    acts = {
        ac: activation_bytes(m, tokens, mode, ac, fused) / (tp * dims.cp) / GB for ac in AC_MODES
    }
    layout = (
        f"{strategy.name} dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {tp}"
        f"{f' x cp {dims.cp}' if dims.cp > 1 else ''}, "
        f"{mode}, micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}, loss "
        f"{cfg.train.loss}"
    )
    return MemoryEstimate(
        params_gb=params / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        buffers_gb=buffers / GB,
        activations_gb=acts,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        layout=layout,
    )


def pipeline_memory(cfg: Config, dims: ParallelDims) -> list[MemoryEstimate]:
    """Per pipeline rank (parallel.pp > 1; parallel/pipeline.py), the memory of the stages it
    runs (parallel/pp_split.py's split), in the order of the pipeline ranks.

    States: 16 bytes per parameter of its stages (the embedding on the first, the final norm and
    the head on the last), divided by tp and, when data-parallel, by dp_shard (FSDP2 shards each
    stage; HSDP replicates over dp_replicate). Buffers: under FSDP2 the stage stays whole in the
    compute dtype, and so do its fp32 gradients, through a schedule step (torch's PipelineStage
    turns resharding after backward and the gradient reduce-scatter off until the last
    micro-batch); without data parallelism, autocast's bf16 weight copies.

    Activations: those of one pipeline micro-batch (train.micro_batch_size / pp_microbatches
    sequences) through the rank's layers (and the head's logits on the last stage), times the
    micro-batches the schedule keeps in flight on that rank (pp_split.in_flight: m for GPipe,
    pp - rank for 1F1B and ZB-V, p + (p-1)/v on rank 0 for interleaved 1F1B)."""
    m, par = cfg.model, cfg.parallel
    tp, mode = dims.tp, precision_mode(cfg)
    fsdp = dims.dp > 1
    if mode == "bf16" and not fsdp:  # without data parallelism a stage runs under autocast
        mode = "autocast"
    pbytes = 4 if mode == "fp32" else 2
    shard = tp * (dims.dp_shard if fsdp else 1)
    chunks = microbatches(cfg)
    tokens = cfg.train.micro_batch_size // chunks * cfg.data.seq_len
    fused = cfg.train.loss == "fused_linear"
    stages = split_stages(m, dims.pp, par.pp_virtual_stages, par.pp_schedule, cfg.data.seq_len)
    # The head's share (final norm, logits, targets): one layer's model minus a layer.
    one, two = (
        activation_bytes(replace(m, n_layers=n), tokens, mode, "none", fused) for n in (1, 2)
    )
    head_only = 2 * one - two
    out = []
    for rank in range(dims.pp):
        mine = [s for s in stages if s.rank == rank]
        n_layers = sum(len(s.layers) for s in mine)
        first, last = any(s.first for s in mine), any(s.last for s in mine)
        p = n_layers * float(block_params(m))
        p += (m.vocab_size * m.dim if first else 0) + (head_params(m) if last else 0)
        matmul = n_layers * (block_params(m) - 2 * m.dim) + (m.vocab_size * m.dim if last else 0)
        if fsdp:
            buffers = (pbytes + GRAD_BYTES) * p / tp
        else:
            buffers = 2 * matmul / tp if mode == "autocast" else 0.0
        held = in_flight(par.pp_schedule, dims.pp, chunks, par.pp_virtual_stages, rank)
        acts = {}
        for ac in AC_MODES:
            per_chunk = activation_bytes(replace(m, n_layers=n_layers), tokens, mode, ac, fused)
            if not last:
                per_chunk -= head_only
            acts[ac] = held * per_chunk / tp / GB
        where = " + ".join(s.describe().split(": ", 1)[1] for s in mine)
        layout = (
            f"{dims.strategy} pp {dims.pp} ({par.pp_schedule}, {chunks} micro-batches) x "
            f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {tp}, pipeline "
            f"rank {rank}: {where}, {held:.3g} micro-batches in flight, {mode}, micro-batch "
            f"{cfg.train.micro_batch_size} x {cfg.data.seq_len}, loss {cfg.train.loss}"
        )
        out.append(
            MemoryEstimate(
                params_gb=WEIGHT_BYTES * p / shard / GB,
                grads_gb=GRAD_BYTES * p / shard / GB,
                optimizer_gb=ADAM_BYTES * p / shard / GB,
                buffers_gb=buffers / GB,
                activations_gb=acts,
                activation_checkpointing=par.activation_checkpointing,
                layout=layout,
            )
        )
    return out
