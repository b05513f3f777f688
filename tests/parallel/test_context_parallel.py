"""Context parallelism (megalite/parallel/context.py): the checks before start, the layout of the
shards, the memory plan, and — on a real 2-rank gloo group — Ulysses attention, ring attention
(torch's, its CUDA kernel replaced by CPU flash attention: tests/parallel/ring_cpu.py) and a whole
model on a split sequence, each against the same computation on one process.

The multi-rank part runs this file as the torchrun script (`python -m`), once, and the tests read
what each rank wrote. Tolerances: the Ulysses all-to-alls only move values, and every head's
attention runs on the same numbers as on one process, so attention matches to fp32 rounding
(1e-6); the model's loss and gradients add the reduction order of the cp average (1e-5, the
parity tests' fp32 tolerance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megalite.config import ModelConfig
from megalite.errors import ConfigError
from megalite.parallel.context import check_cp_device, shard_positions
from megalite.parallel.dims import ParallelDims, check_world_size
from tests.conftest import TINY_MODEL, compose, data_overrides, run_torchrun

# init_std well above the default: attention scores of a few units, so positions (RoPE) matter
# to the loss and a wrong position would show.
CP_MODEL = ModelConfig(
    vocab_size=128,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=64,
    max_seq_len=64,
    init_std=0.3,
)


def cfg_with(tmp_path: Path, *extra: str):
    return compose(
        [*TINY_MODEL, *data_overrides(tmp_path), f"train.run_dir={tmp_path / 'run'}", *extra]
    )


# ------------------------------------------------------------------------- before start
def test_seq_len_not_divisible_by_cp_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len=30 is not divisible by parallel.cp=4"):
        cfg_with(tmp_path, "parallel=fsdp", "parallel.cp=4", "data.seq_len=30")


def test_ring_needs_seq_len_divisible_by_twice_cp(tmp_path):
    ring = ["parallel=fsdp", "parallel.cp=4", "parallel.cp_mode=ring", "data.seq_len=36"]
    with pytest.raises(ConfigError, match=r"data.seq_len=36 is not divisible by 2 x parallel.cp"):
        cfg_with(tmp_path, *ring)
    # Ulysses: 4 contiguous shards of 9 tokens (and 4 kv heads for 4 ranks).
    cfg_with(tmp_path, *ring[:2], "data.seq_len=36", "model.n_kv_heads=4")


def test_cp_of_minus_one_is_checked_once_resolved(tmp_path):
    """cp=-1 takes the rest of the world size; the seq_len check then runs with the dims."""
    cfg = cfg_with(
        tmp_path, "parallel=fsdp", "parallel.dp_shard=1", "parallel.cp=-1", "model.n_kv_heads=4"
    )
    dims = ParallelDims.from_config(cfg.parallel, 3)
    assert (dims.dp_shard, dims.cp, dims.world_size, dims.replication) == (1, 3, 3, 3)
    with pytest.raises(ConfigError, match=r"data.seq_len=32 is not divisible by parallel.cp=3"):
        check_world_size(cfg, dims)


def test_ulysses_needs_heads_divisible_by_cp_times_tp(tmp_path):
    # n_heads=4, n_kv_heads=2: cp=2 alone fits, cp=2 x tp=2 leaves one kv head for 4 ranks.
    cfg_with(tmp_path, "parallel=fsdp", "parallel.cp=2")
    with pytest.raises(
        ConfigError, match=r"parallel.cp=2 x parallel.tp=2 does not divide model.n_kv_heads=2"
    ):
        cfg_with(tmp_path, "parallel=fsdp_tp", "parallel.cp=2", "parallel.tp=2")


def test_strategies_without_a_cp_dim_refuse_it(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.strategy=ddp with parallel.cp=2"):
        cfg_with(tmp_path, "parallel=ddp", "parallel.cp=2")


def test_ring_is_refused_on_cpu_and_off_sdpa(tmp_path):
    cfg = cfg_with(tmp_path, "parallel=fsdp", "parallel.cp=2", "parallel.cp_mode=ring")
    with pytest.raises(ConfigError, match=r"cp_mode=ring needs CUDA .* this run is on cpu"):
        check_cp_device(cfg, "cpu", 2)
    triton = cfg_with(
        tmp_path,
        "parallel=fsdp",
        "parallel.cp=2",
        "parallel.cp_mode=ring",
        "model.attention=triton",
    )
    with pytest.raises(ConfigError, match=r"model.attention=triton; use model.attention=sdpa"):
        check_cp_device(triton, "cuda", 2)
    check_cp_device(cfg, "cuda", 2)  # the CUDA branch: accepted
    check_cp_device(triton, "cpu", 1)  # no cp: nothing to check


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("cp", [2, 4])
def test_shards_partition_the_sequence(mode, cp):
    t = 48
    shards = [shard_positions(t, cp, r, mode) for r in range(cp)]
    assert all(len(s) == t // cp for s in shards)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(t))
    if mode == "ulysses":  # contiguous, in rank order: the all-to-all concatenates in that order
        assert torch.equal(torch.cat(shards), torch.arange(t))


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_shards_are_torchs_head_tail_layout(cp):
    """torch's ring attention with load balancing assumes rank r holds its head-tail indices."""
    from torch.distributed.tensor.experimental._context_parallel import _HeadTailLoadBalancer

    t = 48
    indices = _HeadTailLoadBalancer(t, cp, "cpu")._generate_indices().flatten()
    for r in range(cp):
        assert torch.equal(
            shard_positions(t, cp, r, "ring"), indices[r * t // cp : (r + 1) * t // cp]
        )


def test_memory_plan_divides_activations_and_states_by_cp(tmp_path):
    from megalite.memory import estimate_memory

    cfg = cfg_with(tmp_path, "parallel=fsdp", "parallel.cp=2")
    plain = estimate_memory(cfg, ParallelDims("fsdp", 1, 2, 1))
    cp = estimate_memory(cfg, ParallelDims("fsdp", 1, 2, 1, cp=2))
    for ac in plain.activations_gb:
        assert cp.activations_gb[ac] == pytest.approx(plain.activations_gb[ac] / 2)
    assert cp.params_gb == pytest.approx(plain.params_gb / 2)  # FSDP over dp_shard x cp
    assert cp.optimizer_gb == pytest.approx(plain.optimizer_gb / 2)
    assert "x cp 2" in cp.layout and "cp" not in plain.layout


# ------------------------------------------------------------------- 2 ranks, real gloo
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("cp_ranks")
    res = run_torchrun(2, ["-m", "tests.parallel.test_context_parallel", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.world_size(2)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_ulysses_attention_matches_full_attention(ranks, backend):
    """Output and every input gradient of each rank's shard equal the full computation's, for
    torch SDPA and for a plain matmul-softmax attention (any backend works: Ulysses wraps it)."""
    for rank in ranks:
        assert rank[f"attention_{backend}"] <= 1e-6, rank


@pytest.mark.world_size(2)
def test_ring_attention_matches_full_attention(ranks):
    """torch's ring attention through megalite's RingAttention (grouped-query heads repeated,
    head-tail shards): output and input gradients of each rank's shard equal the full
    computation's. Fed contiguous shards instead (the Ulysses layout), it gives other numbers:
    the ring's causal load balance relies on the head-tail layout, so the check has teeth."""
    for rank in ranks:
        assert rank["attention_ring"] <= 1e-5, rank
        assert rank["attention_ring_wrong_layout"] > 1e-2, rank


@pytest.mark.world_size(2)
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_model_on_split_sequence_matches_one_process(ranks, mode):
    """The loss averaged over the cp group is the full sequence's mean loss, and the averaged
    gradients are the full gradients: RoPE saw global positions (a shard at position 0 would
    change both), and every target was counted once."""
    for rank in ranks:
        assert rank[f"{mode}_loss_rel"] <= 1e-5, rank
        assert rank[f"{mode}_grad_rel"] <= 1e-5, rank
    # Local positions instead of global ones give another loss: the parity above has teeth.
    assert ranks[1][f"{mode}_no_rope_rel"] > 1e-3, ranks[1]


def _math_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor):
    rep = q_BTHD.shape[2] // k_BTKD.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTKD, v_BTKD))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.model.layers import _sdpa
    from megalite.model.transformer import build_model
    from megalite.parallel.context import RingAttention, UlyssesAttention, apply_cp
    from tests.parallel import ring_cpu

    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    result = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    def shard_error(full, full_fn, local_fn, pos, gen) -> float:
        """Largest relative error of local_fn's output and input gradients on this rank's
        tokens `pos` against full_fn on the whole sequence (one random weighting of the
        output as the loss)."""
        for x in full:
            x.grad = None
        out_full = full_fn(*full)
        weight = torch.randn(out_full.shape, generator=gen)
        (out_full * weight).sum().backward()
        local = [x.detach()[:, pos].clone().requires_grad_() for x in full]
        out_local = local_fn(*local)
        (out_local * weight[:, pos]).sum().backward()
        errors = [rel(out_local, out_full[:, pos])]
        errors += [rel(x.grad, f.grad[:, pos]) for x, f in zip(local, full)]
        return max(errors)

    # Attention alone, GQA (4 query heads, 2 kv heads), sequence 2 x 12 tokens.
    gen = torch.Generator().manual_seed(0)
    b, t, h, k, d = 2, 24, 4, 2, 8
    full = [torch.randn(b, t, n, d, generator=gen, requires_grad=True) for n in (h, k, k)]
    contiguous = shard_positions(t, cp, rank, "ulysses")
    for name, fn in (("sdpa", _sdpa), ("math", _math_attention)):
        ulysses = UlyssesAttention(fn, mesh.get_group(), cp)
        result[f"attention_{name}"] = shard_error(full, fn, ulysses, contiguous, gen)

    # Ring attention alone, on head-tail shards (and on contiguous ones).
    ring_cpu.install()
    ring = RingAttention(mesh)
    ring_gen = torch.Generator().manual_seed(1)
    full = [torch.randn(b, t, n, d, generator=ring_gen, requires_grad=True) for n in (h, k, k)]
    for name, pos in (
        ("ring", shard_positions(t, cp, rank, "ring")),
        ("ring_wrong_layout", contiguous),
    ):
        result[f"attention_{name}"] = shard_error(full, _sdpa, ring, pos, ring_gen)

    # A whole model: the cp average of the shard losses and gradients against one process.
    tokens = torch.randint(0, CP_MODEL.vocab_size, (2, 64), generator=gen)
    targets = torch.randint(0, CP_MODEL.vocab_size, (2, 64), generator=gen)
    ref = build_model(CP_MODEL)
    loss_full = ref(tokens, targets)
    loss_full.backward()
    for mode in ("ulysses", "ring"):
        model = build_model(CP_MODEL)
        apply_cp(model, mesh, mode)
        loss = model(tokens, targets)
        loss.backward()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        grads = [p.grad.clone() for p in model.parameters()]
        for g in grads:
            dist.all_reduce(g)
        result[f"{mode}_loss_rel"] = abs(avg.item() / cp - loss_full.item()) / loss_full.item()
        result[f"{mode}_grad_rel"] = max(
            rel(g / cp, p.grad) for g, p in zip(grads, ref.parameters())
        )
        # The same split without global positions: rank r's RoPE rows move by its first
        # position (rolling the table moves row 0 to the row the hook reads first). Rank 0
        # starts at 0 anyway. (Both ranks run the forward: its collectives need every rank.)
        with torch.no_grad():
            first = int(shard_positions(64, cp, rank, mode)[0])
            model.rope.copy_(model.rope.roll(first, dims=1))
            shifted = model(tokens, targets)
        result[f"{mode}_no_rope_rel"] = abs(shifted.item() - loss.item()) / loss.item()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
