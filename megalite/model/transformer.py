"""The decoder-only Llama-style transformer, and how to build and initialize it.

Build on the meta device (no memory, no time), let the parallelize step shard or wrap it, then
materialize and initialize: `build_model(cfg, device)` does the single-device version of this.

Shape legend: B batch, T sequence, C model dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from megalite.config import ModelConfig
from megalite.kernels import reference
from megalite.model.layers import (
    Attention,
    BackendUnavailableError,
    RMSNorm,
    SwiGLU,
    attention_fn,
    rope_cos_sin,
)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = -100


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, attention_fn(cfg.attention))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x_BTC: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x_BTC + self.attention(self.attention_norm(x_BTC), rope)
        return h + self.feed_forward(self.ffn_norm(h))


def loss_fn(backend: str) -> LossFn:
    """(hidden (N, C), output weight (V, C), targets (N,)) -> mean token cross-entropy.

    Every backend takes the final hidden states and the output weight so that `fused_linear` can
    avoid materializing the (N, V) logits; the others compute the logits first.
    """
    if backend == "torch":
        return lambda h, w, y: reference.cross_entropy(h @ w.t(), y, IGNORE_INDEX)
    if backend == "triton":
        try:
            from megalite.kernels.cross_entropy import cross_entropy
        except ImportError as e:
            raise BackendUnavailableError(
                f"train.loss=triton but the Triton cross-entropy kernel cannot be imported ({e}); "
                "use train.loss=torch"
            ) from e
        return lambda h, w, y: cross_entropy(h @ w.t(), y, IGNORE_INDEX)
    if backend == "fused_linear":
        try:
            from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
        except ImportError as e:
            raise BackendUnavailableError(
                f"train.loss=fused_linear but the fused kernel cannot be imported ({e}); "
                "use train.loss=torch"
            ) from e
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, IGNORE_INDEX)
    raise ValueError(f"train.loss={backend!r} is not one of torch, triton, fused_linear")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: str = "torch") -> None:
        super().__init__()
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
            "rope", rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False
        )
        self._loss = loss_fn(loss)

    def forward(
        self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean cross-entropy (a scalar) with them.

        The loss is computed inside forward so that wrappers (DDP, FSDP) see one call, and the
        fused linear + cross-entropy kernel can skip the logits entirely.
        """
        t = tokens_BT.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        h_BTC = self.tok_embeddings(tokens_BT)
        for layer in self.layers.values():
            h_BTC = layer(h_BTC, self.rope)
        h_BTC = self.norm(h_BTC)
        if targets_BT is None:
            return self.output(h_BTC)
        h_NC = h_BTC.reshape(-1, h_BTC.shape[-1])
        return self._loss(h_NC, self.output.weight, targets_BT.reshape(-1))

    def tie_weights(self) -> None:
        """Shares the embedding with the output layer when configured. `to_empty` (meta ->
        device) replaces parameters one module at a time and unties them, so call this again
        after materializing."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix; the projections that write into the residual
        stream (wo, w2) are scaled by 1/sqrt(2 * n_layers) (GPT-2) so its variance does not grow
        with depth. Norm weights are ones. Deterministic for a given seed and device."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        depth_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=gen)
        for layer in self.layers.values():
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                nn.init.normal_(lin.weight, 0.0, std, generator=gen)
            nn.init.normal_(layer.feed_forward.w1.weight, 0.0, std, generator=gen)
            nn.init.normal_(layer.feed_forward.w3.weight, 0.0, std, generator=gen)
            nn.init.normal_(layer.attention.wo.weight, 0.0, depth_std, generator=gen)
            nn.init.normal_(layer.feed_forward.w2.weight, 0.0, depth_std, generator=gen)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std, generator=gen)
        self.rope.copy_(
            rope_cos_sin(
                self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope.device
            )
        )


def build_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", loss: str = "torch", seed: int = 0
) -> Transformer:
    """Builds on meta, materializes on `device`, initializes deterministically from `seed`."""
    with torch.device("meta"):
        model = Transformer(cfg, loss=loss)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def count_params(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights counted once); optionally without the input embedding."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and "tok_embeddings" in name:
            continue
        total += p.numel()
    return total
