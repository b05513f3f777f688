"""KV-cache decoding: same tokens as recomputing the prefix, batch == alone, EOS, seeds, top-k /
top-p, greedy parity with transformers' generate, and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megalite.config import ConfigError, ModelConfig
from megalite.generate import SamplingConfig, filter_logits, generate, sample_next
from megalite.model.layers import KVCache
from megalite.model.transformer import build_model
from tests.conftest import BIN, run_cli
from tests.interop.helpers import random_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Weights wider than the training init so the next-token distribution is far from uniform and
# greedy choices are not decided by rounding.
CFG = ModelConfig(
    vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64,
    init_std=0.2,
)  # fmt: skip
PROMPTS = [[5, 17, 3, 88, 41], [9], [60, 2, 2, 71, 13, 30, 94, 7, 51, 12, 33]]


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=7).eval()


def test_cached_logits_match_a_full_forward(model):
    """Prefill + one token at a time, with left padding, gives the full forward's logits."""
    x = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(2, 2, 33, 2, 8, pad_B=torch.tensor([3, 0]))
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:, :10]], dim=1)
        steps = [model(torch.cat([padded, x[:, :13]]), cache=cache)]
        steps += [model(torch.stack([x[:, i], x[:, i + 3]]), cache=cache) for i in range(10, 27)]
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[0, 3:], full[0, :27], rtol=0, atol=2e-5)
    torch.testing.assert_close(inc[1], full[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=20, temperature=0),
        SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=3),
    ],
    ids=["greedy", "sampled"],
)
def test_kv_cache_gives_the_same_tokens_as_recomputing_the_prefix(model, sampling):
    cached = generate(model, PROMPTS, sampling)
    recomputed = generate(model, PROMPTS, sampling, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in recomputed]
    assert all(len(c.tokens) == 20 and c.finish_reason == "length" for c in cached)
    assert len({tuple(c.tokens) for c in cached}) == 3


def test_a_batch_gives_each_prompt_the_tokens_it_gets_alone(model):
    s = SamplingConfig(max_new_tokens=15, temperature=0)
    batch = generate(model, PROMPTS, s)
    for prompt, out in zip(PROMPTS, batch):
        assert generate(model, [prompt], s)[0].tokens == out.tokens


def test_stops_at_eos_per_sequence(model):
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    free = generate(model, PROMPTS, s)
    # Declare a token the first completion produces (not at once) the end-of-sequence token.
    k = next(i for i, t in enumerate(free[0].tokens) if i >= 2 and t not in free[0].tokens[:i])
    eos = free[0].tokens[k]
    stopped = generate(model, PROMPTS, s, eos=[eos])
    assert stopped[0].tokens == free[0].tokens[:k] and stopped[0].finish_reason == "eos"
    for got, ref in zip(stopped[1:], free[1:]):
        cut = ref.tokens.index(eos) if eos in ref.tokens else len(ref.tokens)
        assert got.tokens == ref.tokens[:cut]
        assert got.finish_reason == ("eos" if cut < len(ref.tokens) else "length")


def test_a_stop_predicate_ends_each_row_and_then_the_batch(model):
    """`stop` ends a row right after the token that made it true (the tokens so far are what
    the free run produced), and once every row has ended no more decoding steps run."""
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    free = generate(model, PROMPTS, s)
    # Each row stops at its 3rd token (no row hits it earlier).
    stopped = generate(model, PROMPTS, s, stop=lambda toks: len(toks) == 3)
    assert [c.tokens for c in stopped] == [c.tokens[:3] for c in free]
    assert all(c.finish_reason == "stop" for c in stopped)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(model, PROMPTS, s, stop=lambda toks: len(toks) == 3)
    finally:
        hook.remove()
    assert len(calls) == 3  # the prefill and 2 decoding steps, not 12
    # A row that never stops runs to the limit; the others end early.
    mixed = generate(model, PROMPTS, s, stop=lambda toks: toks == free[1].tokens[:2])
    assert mixed[1].tokens == free[1].tokens[:2] and mixed[1].finish_reason == "stop"
    others = [i for i in (0, 2) if free[i].tokens[:2] != free[1].tokens[:2]]
    assert others  # the prompts differ, so do their continuations
    for i in others:
        assert mixed[i].tokens == free[i].tokens and mixed[i].finish_reason == "length"


def test_sampling_is_reproducible_under_a_seed(model):
    s = dict(max_new_tokens=16, temperature=1.0)
    a = generate(model, PROMPTS, SamplingConfig(**s, seed=1))
    b = generate(model, PROMPTS, SamplingConfig(**s, seed=1))
    c = generate(model, PROMPTS, SamplingConfig(**s, seed=2))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_top_k_and_top_p_keep_the_right_support():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [False, True, False, True]
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: the nucleus is {1, 3}.
    assert keep(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert keep(filter_logits(logits, top_p=0.1)) == [False, True, False, False]
    gen = torch.Generator().manual_seed(0)
    s = SamplingConfig(temperature=1.0, top_p=0.7)
    draws = sample_next(logits.expand(4000, 4), s, gen)
    assert set(draws.tolist()) == {1, 3}
    assert (draws == 1).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    one = SamplingConfig(temperature=5.0, top_k=1)
    assert sample_next(logits.expand(100, 4), one, gen).eq(1).all()


def test_bad_settings_are_clear_errors(model):
    with pytest.raises(ConfigError, match=r"--top-p=1.5 must be in \(0, 1\]"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match=r"--temperature=-1.0 must be >= 0"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match=r"= 71 exceeds model.max_seq_len=64"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=60))


def test_greedy_matches_transformers_generate_with_left_padding(tmp_path):
    """The same weights in transformers (exported): its generate() with left padding and an
    attention mask picks the same greedy tokens as megalite's batch."""
    transformers = pytest.importorskip("transformers")
    from megalite.checkpoint import load_for_inference
    from megalite.interop.llama_hf import export_hf

    ckpt = random_checkpoint(tmp_path / "ckpt", CFG, seed=11)
    ours, _ = load_for_inference(ckpt)
    hf_dir = export_hf(ours.state_dict(), CFG, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    got = generate(ours, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    assert [c.tokens for c in got] == ref[:, width:].tolist()


def test_cli_generates_a_batch_with_the_checkpoint_tokenizer(tmp_path, tiny_data):
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=64)
    ckpt = random_checkpoint(tmp_path / "ckpt", cfg, tokenizer=tiny_data / "tokenizer.json")
    out = tmp_path / "gen.json"
    args = [str(BIN / "megalite-generate"), str(ckpt), "--prompt", "ROMEO:", "--prompt", "To be"]
    sample = ["--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "40", "--seed", "4"]
    res = run_cli([*args, *sample, "--json", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr
    record = json.loads(out.read_text())
    results = record["results"]
    assert [r["prompt"] for r in results] == ["ROMEO:", "To be"]
    assert all(len(r["tokens"]) == 8 and r["finish_reason"] == "length" for r in results)
    assert record["sampling"]["top_k"] == 40 and record["step"] == 0
    # The same tokens from the library with the run's tokenizer: the CLI tokenized the prompts
    # with the checkpoint's tokenizer.json and seeded the sampler.
    from tokenizers import Tokenizer

    from megalite.checkpoint import load_for_inference

    tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    lib = generate(
        load_for_inference(ckpt)[0],
        [tok.encode("ROMEO:").ids, tok.encode("To be").ids],
        SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=40, seed=4),
        eos=[tok.token_to_id("<|endoftext|>")],
    )
    assert [r["tokens"] for r in results] == [c.tokens for c in lib]
    assert results[0]["completion"] == tok.decode(lib[0].tokens)
    assert res.stdout.count("--- ") == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    from megalite.generate import main

    def error(args: list[str]) -> str:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megalite-generate: error: ")
        return lines[0]

    assert error([str(tmp_path / "nope"), "--prompt", "x"]) == (
        f"megalite-generate: error: checkpoint '{tmp_path / 'nope'}' does not exist; give a "
        "step_N checkpoint dir, a run dir (its newest checkpoint is used) or a megalite-convert "
        "output dir"
    )
    ckpt = random_checkpoint(tmp_path / "ckpt", CFG)
    assert "no prompt; pass --prompt TEXT" in error([str(ckpt)])
    assert "--top-k=0 must be >= 1" in error([str(ckpt), "--prompt", "x", "--top-k", "0"])
    msg = error([str(ckpt), "--prompt", "x"])
    assert "no tokenizer for checkpoint" in msg and "pass --tokenizer" in msg
