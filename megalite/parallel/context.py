"""Context parallelism: every sequence is split over the `cp` ranks of a group, applied from
outside the (single-device) model.

The ranks of one cp group read the same samples (`ParallelDims.replication`); a forward pre-hook
on the model keeps this rank's part of the tokens and targets, and a pre-hook on each attention
module hands it the RoPE rows of those tokens' global positions. Everything outside attention
(embedding, norms, MLP, output layer, loss) is per token, so it runs on the shard unchanged.
Attention needs every key, in one of two ways (`parallel.cp_mode`):

- ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023): one all-to-all turns q, k, v from
  (B, T/cp, H, D) into (B, T, H/cp, D) — the whole sequence for a slice of heads — the model's own
  attention function runs on that, and one all-to-all turns the output back. It works with any
  attention backend (sdpa, triton, flash_attn) and any process group (gloo on a CPU), and sends
  3 x B x T x C / cp values per rank and layer, independent of cp. Heads and kv heads must divide
  by cp x tp. Each rank holds a contiguous slice of the sequence.
- ring (torch's ring attention, `torch.distributed.tensor.experimental`): q stays local, k and v
  travel round the ring, softmax statistics are merged. Only CUDA SDPA kernels have ring versions
  (no CPU), so preflight refuses it elsewhere. Causal load balance: rank i holds chunks i and
  2cp-1-i of 2cp chunks (torch's head-tail layout), so all ranks do equal work.

The loss: each rank computes the mean over its tokens; every rank holds the same number of
tokens (packed samples: every target counts), so the mean over the cp group — what the trainer's
all-reduce and FSDP's gradient averaging over dp_shard x cp compute — is the mean over the whole
sequence.

Shape legend: B batch, T (global) sequence, S this rank's shard (T / cp), H query heads, K kv
heads, h = H / cp, D head dim, c the cp degree, X one head group of q, k and v stacked
((H + 2K) / cp).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from megalite.config import CP_MODES, Config
from megalite.errors import ConfigError
from megalite.model.layers import AttentionFn


def shard_positions(seq_len: int, cp: int, rank: int, mode: str) -> torch.Tensor:
    """The global positions (S,) of the tokens cp rank `rank` holds, in the order it holds
    them: a contiguous slice (ulysses), or chunks rank and 2cp-1-rank of 2cp (ring's causal
    load balance, the layout torch's ring attention assumes when load balancing is on)."""
    if mode not in CP_MODES:
        raise ValueError(f"parallel.cp_mode={mode!r} is not one of {', '.join(CP_MODES)}")
    if mode == "ulysses":
        s = seq_len // cp
        return torch.arange(rank * s, (rank + 1) * s)
    chunk = seq_len // (2 * cp)
    head = torch.arange(rank * chunk, (rank + 1) * chunk)
    tail = torch.arange(seq_len - (rank + 1) * chunk, seq_len - rank * chunk)
    return torch.cat([head, tail])


class _Layout:
    """This rank's positions for the sequence length of the current forward, set by the model's
    pre-hook and read by every attention module's (which under tensor parallelism may see a
    tp-sharded input, so it cannot infer the global length itself)."""

    def __init__(self, cp: int, rank: int, mode: str) -> None:
        self.cp, self.rank, self.mode = cp, rank, mode
        self.positions: torch.Tensor | None = None
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def select(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = (seq_len, device)
        if key not in self._cache:
            self._cache[key] = shard_positions(seq_len, self.cp, self.rank, self.mode).to(device)
        self.positions = self._cache[key]
        return self.positions


def _all_to_all(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i (with autograd:
    the backward is the reverse all-to-all)."""
    return all_to_all_single_autograd(x.contiguous(), None, None, group)


class UlyssesAttention:
    """Wraps an attention function on (B, S, heads, D) shards so that it runs on (B, T, heads/cp,
    D): the whole sequence for this rank's slice of heads."""

    def __init__(self, inner: AttentionFn, group: ProcessGroup, cp: int) -> None:
        self.inner, self.group, self.cp = inner, group, cp

    def __call__(
        self, q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor
    ) -> torch.Tensor:
        cp = self.cp
        h, k = q_BSHD.shape[2] // cp, k_BSKD.shape[2] // cp
        # Head group j of q (heads j*h..) and of k, v (j*k..) go to rank j together: with
        # grouped-query attention, q head i reads kv head i // (H/K), which stays in group j.
        qkv_BScXD = torch.cat([t.unflatten(2, (cp, -1)) for t in (q_BSHD, k_BSKD, v_BSKD)], dim=3)
        qkv_cBSXD = _all_to_all(qkv_BScXD.movedim(2, 0), self.group)
        # Chunk i came from rank i: sequence slice i, so concatenating in rank order is T.
        qkv_BTXD = qkv_cBSXD.movedim(0, 1).flatten(1, 2)
        q, kk, v = (t.contiguous() for t in qkv_BTXD.split([h, k, k], dim=2))
        out_BThD = self.inner(q, kk, v)
        out_cBShD = _all_to_all(out_BThD.unflatten(1, (cp, -1)).movedim(1, 0), self.group)
        # Chunk i is head group i of this rank's slice: heads back in order.
        return out_cBShD.movedim(0, 2).flatten(2, 3)


class RingAttention:
    """torch's ring attention on (B, S, heads, D) shards laid out by `shard_positions(...,
    "ring")`: SDPA on DTensors sharded over the sequence, which the context-parallel dispatcher
    turns into ring flash / efficient / cuDNN attention. CUDA only (no CPU SDPA has a ring
    version)."""

    def __init__(self, cp_mesh: DeviceMesh) -> None:
        from torch.distributed.tensor.experimental._context_parallel import (
            _cp_options,
            _enable_context_parallel_dispatcher,
        )

        self.mesh = cp_mesh
        # Our shards are torch's head-tail layout; the dispatcher is process-wide (it handles
        # only SDPA on DTensors, which nothing else in megalite calls).
        _cp_options.enable_load_balance = True
        _enable_context_parallel_dispatcher()

    def __call__(
        self, q_BSHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor
    ) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        rep = q_BSHD.shape[2] // k_BSKD.shape[2]
        if rep > 1:  # the ring kernels take as many kv heads as query heads
            k_BSKD, v_BSKD = (t.repeat_interleave(rep, dim=2) for t in (k_BSKD, v_BSKD))
        q, k, v = (
            DTensor.from_local(t.transpose(1, 2), self.mesh, [Shard(2)], run_check=False)
            for t in (q_BSHD, k_BSKD, v_BSKD)
        )
        out_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out_BHSD.to_local().transpose(1, 2)


def attention_wrapper(
    inner: AttentionFn, mode: str, cp_mesh: DeviceMesh
) -> UlyssesAttention | RingAttention:
    if mode == "ulysses":
        return UlyssesAttention(inner, cp_mesh.get_group(), cp_mesh.size())
    return RingAttention(cp_mesh)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, mode: str) -> None:
    """Makes `model` (a megalite Transformer, before activation checkpointing, compile and FSDP)
    train on this rank's part of each sequence. Parameter names do not change (hooks and the
    attention function only), so checkpoints move freely between cp and other layouts."""
    layout = _Layout(cp_mesh.size(), cp_mesh.get_local_rank(), mode)

    def shard_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None:
            raise ValueError(
                "a context-parallel model does not decode with a KV cache; load the checkpoint "
                "into a plain model (megalite.generate) instead"
            )
        tokens_BT, *rest = args
        t = tokens_BT.shape[1]
        if t % layout.cp or (mode == "ring" and t % (2 * layout.cp)):
            raise ValueError(
                f"sequence length {t} does not split into parallel.cp={layout.cp} equal shards "
                f"(parallel.cp_mode={mode})"
            )
        pos_S = layout.select(t, tokens_BT.device)
        tokens_BS = tokens_BT.index_select(1, pos_S)
        rest = [y.index_select(1, pos_S) if torch.is_tensor(y) else y for y in rest]
        if torch.is_tensor(kwargs.get("targets_BT")):
            kwargs = {**kwargs, "targets_BT": kwargs["targets_BT"].index_select(1, pos_S)}
        return (tokens_BS, *rest), kwargs

    def global_rope(module: nn.Module, args: tuple) -> tuple:
        # The model slices rope[:, :S] for S local tokens: give it the rows of their positions.
        x, rope, *rest = args
        return (x, rope.index_select(1, layout.positions), *rest)

    model.register_forward_pre_hook(shard_inputs, with_kwargs=True)
    for block in model.layers.values():
        attention = block.attention
        attention.register_forward_pre_hook(global_rope)
        # The attention function is the model's seam for backends (model/layers.py,
        # attention_fn): context parallelism wraps whichever one the config chose.
        attention._attention = attention_wrapper(attention._attention, mode, cp_mesh)


def fsdp_mesh(mesh: DeviceMesh, dp_replicate: int) -> DeviceMesh:
    """The mesh FSDP shards over under context parallelism: dp_shard x cp flattened into one dim
    (torchtitan's dp_shard_cp), so each cp rank keeps 1 / (dp_shard x cp) of the states and its
    gradients are averaged with its cp peers' (each computed on another part of the same
    sequences); with HSDP, (dp_replicate, dp_shard_cp)."""
    flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    if dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return flat


def check_cp_device(cfg: Config, device_type: str, cp: int) -> None:
    """The cp checks that need the device and the resolved backends (preflight)."""
    if cp <= 1 or cfg.parallel.cp_mode != "ring":
        return
    if device_type != "cuda":
        raise ConfigError(
            f"parallel.cp_mode=ring needs CUDA (torch's ring attention has no CPU kernels) but "
            f"this run is on {device_type}; use parallel.cp_mode=ulysses"
        )
    if cfg.model.attention not in ("sdpa", "auto"):  # auto is sdpa on CUDA (backends.py)
        raise ConfigError(
            f"parallel.cp_mode=ring replaces torch SDPA but model.attention="
            f"{cfg.model.attention}; use model.attention=sdpa, or parallel.cp_mode=ulysses (any "
            "attention backend)"
        )
