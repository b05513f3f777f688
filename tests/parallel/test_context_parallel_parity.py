"""Context parallelism trains the same model as one process, through the real trainer: 512-token
sequences split over 2 ranks (Ulysses all-to-all on gloo), alone, with FSDP over dp_shard x cp,
with HSDP and full activation checkpointing, and with tensor parallelism; and the same with torch's
ring attention (`parallel.cp_mode=ring`) in each of those layouts, its per-chunk CUDA kernel replaced
by CPU flash attention (tests/parallel/ring_cpu.py: the ring, its load balance, its merge and its
backward are torch's own code on gloo).

Two torchrun jobs (2 ranks, then 4), per-step losses and validation losses compared with one
process on the same global batch, as tests/parallel/test_parity.py does for the other layouts and
with its fp32 tolerance (1e-5 relative): context parallelism changes only the order of sums (the
cp average of shard losses and gradients), ~1e-7 per op. The issue asks for "the bf16 tolerance"
(1e-3); fp32 at 1e-5 is the stricter check.
"""

from __future__ import annotations

import json

import pytest

from tests.parallel.test_parity import FP32_RTOL, assert_same, overrides, single, torchrun

SEQ = 512
# The tiny model (tests/conftest.py TINY_MODEL) at 512 positions, with 4 kv heads so that one
# reference serves every case: Ulysses under cp x tp = 4 splits kv heads 4 ways. (Grouped-query
# attention under cp: tests/parallel/test_context_parallel.py.)
LONG = [f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "model.n_kv_heads=4"]
RING = ["parallel.cp=2", "parallel.cp_mode=ring", "model.attention=sdpa"]


@pytest.fixture(scope="module")
def data512(tiny_corpus, tmp_path_factory):
    """The tiny corpus packed into samples of 512 + 1 tokens."""
    from megalite.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("data512") / "tiny512"
    prepare(
        PrepareOptions(
            inputs=[str(tiny_corpus)], out=str(out), seq_len=SEQ, vocab_size=512, val_fraction=0.25
        )
    )
    return out


# Multi-rank layouts: (name, ranks, micro-batch, overrides), each with Ulysses and with ring. 2
# sequences per micro-batch over the data-parallel ranks in every layout (the ranks of a cp group
# read the same ones), 2 micro-batches per step.
TP2 = ["parallel=fsdp_tp", "parallel.tp=2", "parallel.dp_shard=1"]
HSDP_AC = ["parallel=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=1",
           "parallel.activation_checkpointing=full"]  # fmt: skip
LAYOUTS = [
    ("2", 2, 2, ["parallel=fsdp"]),
    ("2_dp2", 4, 1, ["parallel=fsdp"]),
    ("2_tp2", 4, 2, TP2),
    ("2_hsdp_ac", 4, 1, HSDP_AC),
]
MODES = {"cp": ["parallel.cp=2"], "ring": RING}
NAMES = [mode + layout for layout, *_ in LAYOUTS for mode in MODES]


@pytest.fixture(scope="module")
def runs(data512, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_parity")
    r = {name: tmp / name for name in [*NAMES, "single"]}
    jobs: dict[int, list[list[str]]] = {}
    for layout, ranks, micro, extra in LAYOUTS:
        for mode, cp in MODES.items():
            name = mode + layout
            jobs.setdefault(ranks, []).append(
                overrides(data512, r[name], micro, *extra, *cp, *LONG)
            )
    for ranks, cases in jobs.items():
        torchrun(ranks, cases, tmp, driver="ring_driver.py")
    single(data512, r["single"], *LONG, "train.micro_batch_size=2")
    return r


@pytest.mark.slow
@pytest.mark.world_size(4)
@pytest.mark.parametrize("name", NAMES)
def test_context_parallel_matches_single_process(runs, name):
    worst = assert_same(runs[name], runs["single"], FP32_RTOL)
    print(f"{name}: max relative loss difference to one process {worst:.2e}")
    # The ring runs went through torch's ring attention (every layer, forward and backward, on
    # every micro-batch and eval batch), the Ulysses runs never did.
    calls = json.loads((runs[name] / "ring_calls.json").read_text())
    if name.startswith("ring"):
        assert calls["forward"] > 0 and calls["backward"] > 0, calls
    else:
        assert calls == {"forward": 0, "backward": 0}, calls
