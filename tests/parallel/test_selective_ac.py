"""Selective activation checkpointing keeps the attention op and the TP reduce-scatters.

An op counter (a TorchDispatchMode below checkpointing's own) sees every op that really runs: an
op whose output selective AC saved is answered from the cache during the backward's recompute
and never reaches it. So a saved attention forward runs once per layer, a recomputed one twice.
"""

from __future__ import annotations

import collections
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.config import ModelConfig
from megalite.model.transformer import Transformer, build_model
from megalite.parallel.checkpointing import apply_ac

N_LAYERS = 3
# head_dim 32: the smallest the Triton attention kernel takes.
MODEL = dict(vocab_size=64, dim=64, n_layers=N_LAYERS, n_heads=2, ffn_dim=96, max_seq_len=32)
ATTENTION_FWD = {
    "sdpa": "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "triton": "megalite.flash_attention_fwd.default",
}
REDUCE_SCATTER = "_c10d_functional.reduce_scatter_tensor.default"


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _forward_backward_counts(model: torch.nn.Module, tokens: torch.Tensor) -> OpCounter:
    counter = OpCounter()
    with counter:
        model(tokens, tokens).backward()
    return counter


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_selective_ac_runs_the_attention_forward_once_per_layer(attention: str) -> None:
    """model.attention=triton used to re-run megalite::flash_attention_fwd in every block's
    backward (the save list knew only the aten SDPA ops)."""
    model = build_model(ModelConfig(**MODEL, attention=attention, norm="torch"), loss="torch")
    apply_ac(model, "selective")
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 24))
    counts = _forward_backward_counts(model, tokens).counts
    assert counts[ATTENTION_FWD[attention]] == N_LAYERS, dict(counts)
    # Only the cheap ops are recomputed: a block's matmuls run as often as without AC.
    reference = build_model(ModelConfig(**MODEL, attention=attention, norm="torch"), loss="torch")
    plain = _forward_backward_counts(reference, tokens).counts
    assert counts["aten.mm.default"] == plain["aten.mm.default"]


# ------------------------------------------------------------ tensor parallel (2 ranks, gloo)
def _tp_rank(rank: int, port: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from megalite.parallel.parallelize import _copy_shard
    from megalite.parallel.tp import apply_tp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        tokens = torch.randint(
            0, MODEL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0)
        )
        for mode in ("none", "selective"):
            with torch.device("meta"):
                model = Transformer(
                    ModelConfig(**MODEL, attention="sdpa", norm="torch"), loss="torch"
                )
            apply_tp(model, mesh)
            apply_ac(model, mode)
            model.to_empty(device="cpu")
            model.init_weights(seed=0, copy_fn=_copy_shard)
            counter = OpCounter()
            with counter, loss_parallel():
                model(tokens, tokens).backward()
            results[(rank, mode)] = counter.counts[REDUCE_SCATTER]
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.world_size(2)
def test_selective_ac_adds_no_reduce_scatter_under_tensor_parallelism() -> None:
    """Sequence parallelism ends every attention and MLP with a reduce-scatter; selective AC
    saves its output, so forward + backward run as many reduce-scatters as without AC. (Without
    it, 17 against 14 with 3 layers: the recompute stops after the last tensor backward needs,
    so each block re-runs its attention's reduce-scatter but not its MLP's.)"""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_tp_rank, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        none, selective = results[(rank, "none")], results[(rank, "selective")]
        assert none >= 2 * N_LAYERS, results  # the collectives are seen at all
        assert selective == none, results
