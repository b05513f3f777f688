"""The decoder-only Llama-style transformer, and how to build and initialize it.

Build on the meta device (no memory, no time), let the parallelize step shard or wrap it, then
materialize and initialize: `build_model(cfg, device)` does the single-device version of this.

Shape legend: B batch, T sequence, C model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable

import torch
import torch.nn as nn

from megalite.backends import ATTENTION, LOSS, NORM
from megalite.config import ModelConfig
from megalite.kernels import reference
from megalite.model.layers import (
    Attention,
    BackendUnavailableError,
    KVCache,
    RMSNorm,
    SwiGLU,
    attention_fn,
    rope_cos_sin,
)

CrossEntropyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FusedLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CopyFn = Callable[[torch.Tensor, torch.Tensor], object]
IGNORE_INDEX = -100


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, attention_fn(cfg.attention))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(
        self, x_BTC: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        # cache and layer_id go by keyword: a tensor-parallel plan lays out positional inputs.
        h = x_BTC + self.attention(
            self.attention_norm(x_BTC), rope, cache=cache, layer_id=self.layer_id
        )
        return h + self.feed_forward(self.ffn_norm(h))


def cross_entropy_fn(backend: str) -> CrossEntropyFn:
    """(logits (N, V), targets (N,)) -> mean token cross-entropy, for `train.loss=torch|triton`."""
    if backend == "torch":
        return lambda logits, y: reference.cross_entropy(logits, y, IGNORE_INDEX)
    if backend == "triton":
        try:
            from megalite.kernels.cross_entropy import cross_entropy
        except ImportError as e:
            raise BackendUnavailableError(
                f"train.loss=triton but the Triton cross-entropy kernel cannot be imported ({e}); "
                "use train.loss=torch"
            ) from e
        return lambda logits, y: cross_entropy(logits, y, IGNORE_INDEX)
    raise ValueError(f"{LOSS.key}={backend!r} is not one of {', '.join(LOSS.backends)}")


def fused_linear_loss_fn() -> FusedLossFn:
    """(hidden (N, C), output weight (V, C), targets (N,)) -> mean cross-entropy, without ever
    materializing the (N, V) logits (`train.loss=fused_linear`)."""
    try:
        from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    except ImportError as e:
        raise BackendUnavailableError(
            f"train.loss=fused_linear but the fused kernel cannot be imported ({e}); "
            "use train.loss=torch"
        ) from e
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, IGNORE_INDEX)


def resolve_backends(
    cfg: ModelConfig, loss: str, device_type: str, tp: int = 1
) -> tuple[ModelConfig, str]:
    """Replaces `auto` backends with concrete ones for this device type and TP degree, by the
    rules of the backend tables (megalite/backends.py)."""
    attention = ATTENTION.resolve(cfg.attention, device_type, tp)
    norm = NORM.resolve(cfg.norm, device_type, tp)
    loss = LOSS.resolve(loss, device_type, tp)
    return dataclasses.replace(cfg, attention=attention, norm=norm), loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: str = "auto") -> None:
        super().__init__()
        # The trainer resolves `auto` for its device and layout first; standalone use (tests,
        # interop, generation) gets the choice for the local machine.
        local = "cuda" if torch.cuda.is_available() else "cpu"
        cfg, loss = resolve_backends(cfg, loss, local)
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed by layer index keeps parameter names stable when layers are split
        # across pipeline stages or wrapped one by one.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Recomputed in init_weights (buffers built on meta hold no values); not checkpointed.
        self.register_buffer(
            "rope",
            rope_cos_sin(
                cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling_params
            ),
            persistent=False,
        )
        if loss == "fused_linear":
            self._fused_loss: FusedLossFn | None = fused_linear_loss_fn()
        else:
            self._fused_loss, self._cross_entropy = None, cross_entropy_fn(loss)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean cross-entropy (a scalar) with them.

        The loss is computed inside forward so that wrappers (DDP, FSDP) see one call, and the
        fused linear + cross-entropy kernel can skip the logits entirely. Under tensor
        parallelism the logits are vocab-sharded and the loss runs inside `loss_parallel`.
        With a `cache` (incremental decoding), `tokens_BT` continue the cached slots.
        """
        t = tokens_BT.shape[1]
        n = t if cache is None else cache.filled + t
        if n > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {n} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        h_BTC = self.tok_embeddings(tokens_BT)
        if cache is not None:
            cache.begin(t)
        for layer in self.layers.values():
            # Training calls a block with exactly (h, rope): what compiled graphs and parallel
            # plans were built for.
            h_BTC = layer(h_BTC, self.rope) if cache is None else layer(h_BTC, self.rope, cache)
        if cache is not None:
            cache.advance(t)
        h_BTC = self.norm(h_BTC)
        if targets_BT is not None and self._fused_loss is not None:
            return self._fused_loss(h_BTC.flatten(0, 1), self.output.weight, targets_BT.flatten())
        # Calling the output module (not its weight) lets a tensor-parallel plan hook it.
        logits_BTV = self.output(h_BTC)
        if targets_BT is None:
            return logits_BTV
        return self._cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())

    def tie_weights(self) -> None:
        """Shares the embedding with the output layer when configured. `to_empty` (meta ->
        device) replaces parameters one module at a time and unties them, so call this again
        after materializing."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_std(self, name: str) -> float | None:
        """Init of the parameter `name`: Normal(0, std), or None for ones (norm weights).

        Every matrix gets `init_std`; the projections that write into the residual stream (wo,
        w2) get init_std / sqrt(2 * n_layers) (GPT-2) so its variance does not grow with depth.
        """
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def init_weights(self, seed: int = 0, copy_fn: CopyFn | None = None) -> None:
        """Initializes every parameter from its own generator, seeded by (seed, name): the
        weights do not depend on the order of initialization or on how the model is split.
        `copy_fn(param, full)` writes the full tensor into a parameter; the parallelize step
        passes one that keeps only this rank's shard."""
        copy_fn = copy_fn or (lambda param, full: param.copy_(full))
        for name, param in self.named_parameters():
            name = canonical_name(name)
            copy_fn(param, self.initial_value(name, param.shape, param.device, param.dtype, seed))
        self.init_buffers()

    def initial_value(
        self, name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype, seed: int = 0
    ) -> torch.Tensor:
        """The full initial value of parameter `name` (canonical), from a generator seeded by
        (seed, name). ZeRO-3 calls it one parameter at a time (parallel/deepspeed.py)."""
        std = self.init_std(name)
        if std is None:
            return torch.ones(shape, device=device, dtype=dtype)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    @torch.no_grad()
    def init_buffers(self) -> None:
        cfg = self.cfg
        rope = rope_cos_sin(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope.device, cfg.rope_scaling_params
        )
        self.rope.copy_(rope)


def canonical_name(name: str) -> str:
    """A parameter's name without the prefixes wrappers add (activation checkpointing, compile),
    as it appears in checkpoints."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def build_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", loss: str = "auto", seed: int = 0
) -> Transformer:
    """Builds on meta, materializes on `device`, initializes deterministically from `seed`."""
    with torch.device("meta"):
        model = Transformer(cfg, loss=loss)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def count_params(model: nn.Module) -> int:
    """Unique parameters of a built module (tied weights counted once). From a config, without
    building: shapes.param_count."""
    return sum(p.numel() for p in model.parameters())
