"""Shape arithmetic: what a model's shape implies, without building it.

Parameter counts, FLOPs per token and bytes per parameter, read by the planner (plan.py), the
memory estimate (memory.py), preflight, the trainer's MFU and the benchmark runner. A model that
is built counts its own parameters (`model.transformer.count_params`); tests check the two agree.

FLOP convention (the PaLM paper's, appendix B; also Megatron-LM's and torchtitan's):

    flops_per_token = 6 * N_matmul + 12 * n_layers * dim * seq_len

- N_matmul counts every weight used in a matrix multiply: the attention and MLP projections and
  the output head (tied or not: a tied embedding is still one (V, C) matmul in the head). The
  input embedding is a lookup, not a matmul, and norms are elementwise: both excluded.
- 6 = 2 (multiply + add) x 3 (forward, and backward for activations and for weights).
- The attention term counts QK^T and AV over the full T x T score matrix, forward and backward:
  2 matmuls x 2 FLOPs x T x dim per token per layer x 3. No causal halving: a causal kernel does
  about half that work, so this convention overstates attention FLOPs by up to 2x (it matches the
  numbers published by PaLM, Megatron-LM and torchtitan, which is the point of an MFU).
- Activation recompute is not counted here: that is HFU, below.

Hardware FLOPs per token (`hardware_flops_per_token`) add what activation checkpointing runs
again in backward, as PyTorch's checkpoint actually executes it (checked with FlopCounterMode).
`full` re-runs each block's forward, but stops as soon as every tensor backward needs is rebuilt
(non-reentrant checkpoint's early stop): the MLP's down projection w2 only feeds the residual
add, which saves nothing, so it is not re-run. That adds 2 * (N_blocks - n_layers * dim * ffn) +
4 * n_layers * dim * seq_len (N_blocks = N_matmul without the output head, which is outside the
checkpointed blocks); Megatron-LM's "8x for the blocks" formula, which re-runs w2 too, would
count 2 * n_layers * dim * ffn more. `selective` keeps the matmul and attention outputs and
recomputes only elementwise ops, so it adds no matmul FLOPs. Elementwise FLOPs (norms, RoPE,
SiLU, softmax) are excluded from both counts.

Bytes per parameter: training keeps fp32 master weights, fp32 gradients and AdamW's two fp32
moments (4 + 4 + 8); a checkpoint holds the weights and the moments, not the gradients (12).
"""

from __future__ import annotations

from megalite.backends import AC_MODES
from megalite.config import ModelConfig
from megalite.errors import ConfigError

# Training state per parameter, all fp32 (bf16 compute copies are the memory estimate's buffers).
WEIGHT_BYTES = 4
GRAD_BYTES = 4
ADAM_BYTES = 8  # exp_avg and exp_avg_sq
CHECKPOINT_BYTES_PER_PARAM = WEIGHT_BYTES + ADAM_BYTES
# DCP's metadata, the trainer state and the data loader's position on top of the tensors.
CHECKPOINT_OVERHEAD = 0.05


# ------------------------------------------------------------------------------ parameters
def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: attention, SwiGLU and two norm weights."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return attn + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim


def head_params(cfg: ModelConfig) -> int:
    """Parameters of the final norm and the output layer (the tied embedding when tied)."""
    return cfg.dim + cfg.vocab_size * cfg.dim


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes (tied embeddings counted once), from its shape."""
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return embedding + cfg.n_layers * block_params(cfg) + head_params(cfg)


def checkpoint_bytes(n_params: int) -> int:
    """One checkpoint on disk: fp32 weights plus AdamW's two fp32 moments, and the overhead."""
    return int(n_params * CHECKPOINT_BYTES_PER_PARAM * (1 + CHECKPOINT_OVERHEAD))


# ----------------------------------------------------------------------------------- FLOPs
def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all projections plus the output head."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # wq, wo, wk, wv
    mlp = 3 * cfg.dim * cfg.hidden_dim
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) by the convention in the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def hardware_flops_per_token(
    cfg: ModelConfig, seq_len: int, activation_checkpointing: str = "none"
) -> float:
    """Training FLOPs per token actually executed, with the forward recompute of activation
    checkpointing (`parallel.activation_checkpointing`); the numerator of HFU."""
    if activation_checkpointing not in AC_MODES:
        raise ConfigError(
            f"parallel.activation_checkpointing={activation_checkpointing!r} is not one of "
            f"{', '.join(AC_MODES)}"
        )
    model = flops_per_token(cfg, seq_len)
    if activation_checkpointing != "full":
        return model
    # Every block matmul but the down projection (see the module docstring), and attention.
    recomputed = (
        matmul_params(cfg) - cfg.dim * cfg.vocab_size - cfg.n_layers * cfg.dim * cfg.hidden_dim
    )
    return model + 2.0 * recomputed + 4.0 * cfg.n_layers * cfg.dim * seq_len
