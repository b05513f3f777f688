"""Llama interop against transformers as the oracle: imported logits match LlamaForCausalLM's,
exported dirs load with from_pretrained / AutoTokenizer offline and match megalite's logits,
round trips are bitwise, Meta's interleaved RoPE layout is permuted correctly, and every
unsupported input is one clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megalite.checkpoint import load_for_inference
from megalite.config import ModelConfig
from megalite.interop.llama_hf import InteropError, export_hf, import_hf, import_meta
from megalite.interop.llama_map import (
    HF_NAMES,
    half_to_interleaved,
    hf_name,
    interleaved_to_half,
    megalite_name,
    model_config_from_hf,
)
from megalite.model.layers import apply_rope, rope_cos_sin
from tests.conftest import BIN, run_cli
from tests.interop.helpers import random_checkpoint, random_hf_llama

# Before transformers is imported: it reads the variable once. Everything here is local anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOL = dict(rtol=1e-5, atol=1e-5)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def cli_error(args: list[str]) -> str:
    res = run_cli([str(BIN / "megalite-convert"), *args], env=OFFLINE, timeout=300)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megalite-convert: error: "), res.stderr
    return lines[0]


# ------------------------------------------------------------------------------- names
def test_name_table_maps_every_parameter_both_ways():
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=80)
    hf = random_hf_llama(tied=False, num_hidden_layers=3)
    with torch.device("meta"):
        from megalite.model.transformer import Transformer

        ours = Transformer(cfg)
    ours_names = set(ours.state_dict())
    assert {hf_name(n) for n in ours_names} == set(hf.state_dict())
    assert all(megalite_name(hf_name(n)) == n for n in ours_names)
    assert megalite_name("model.layers.0.self_attn.q_proj.bias") is None
    assert megalite_name("model.vision_tower.proj.weight") is None
    assert len(HF_NAMES) == 12


# ------------------------------------------------------------------------------ import
@pytest.mark.parametrize(
    "tied, n_kv, shard",
    [(False, 2, False), (True, 2, True), (False, 6, True), (True, 1, False)],
    ids=["gqa-untied", "gqa-tied-sharded", "mha-untied-sharded", "mqa-tied"],
)
def test_imported_logits_match_transformers(tmp_path, tied, n_kv, shard):
    hf = random_hf_llama(tied=tied, n_kv=n_kv)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB" if shard else "1GB")
    assert (src / "model.safetensors.index.json").is_file() == shard
    res = import_hf(src, tmp_path / "ml")
    assert (res.cfg.tie_embeddings, res.cfg.kv_heads, res.cfg.rope_theta) == (tied, n_kv, 5e5)
    model, meta = load_for_inference(res.out)
    assert meta["step"] == 0 and meta["source"]["format"] == "huggingface-llama"
    x = torch.randint(0, 97, (3, 29))
    ref = logits(hf, x)
    assert ref.std() > 1.0  # far from uniform: a wrong weight would show
    torch.testing.assert_close(logits(model, x), ref, **TOL)
    if tied:
        assert model.output.weight is model.tok_embeddings.weight


def test_cli_import_prints_a_preset_and_overrides_the_trainer_config_accepts(tmp_path, capsys):
    """Both ways of giving the trainer the imported shape (the written preset, the printed
    overrides) compose to the checkpoint's exact ModelConfig."""
    from megalite.interop.cli import main
    from tests.conftest import compose

    hf = random_hf_llama(tied=False)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ml"
    assert main(["from-hf", str(tmp_path / "hf"), str(out), "--name", "t"]) == 0
    stdout = capsys.readouterr().out
    assert f"-cd {out}/conf model=t train.init_from={out}" in stdout
    cfg = compose([f"hydra.searchpath=[file://{out}/conf]", "model=t", "data.seq_len=32"])
    meta = json.loads((out / "meta.json").read_text())
    assert {k: getattr(cfg.model, k) for k in meta["model"]} == meta["model"]
    overrides = stdout.split("megalite-train ")[-1].split(" train.init_from")[0].split()
    cfg2 = compose([*overrides, "data.seq_len=32"])
    assert cfg2.model == cfg.model


# ------------------------------------------------------------------------------ export
def test_export_loads_in_transformers_with_its_tokenizer(tmp_path, tiny_data):
    """megalite checkpoint -> HF dir via the CLI: from_pretrained (offline) gives megalite's
    logits; AutoTokenizer encodes as the run's tokenizer; EOS is in config and tokenizer."""
    from tokenizers import Tokenizer

    cfg = ModelConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
        rope_theta=1e4, norm_eps=1e-6, init_std=0.2,
    )  # fmt: skip
    ckpt = random_checkpoint(tmp_path / "ckpt", cfg, seed=3, tokenizer=tiny_data / "tokenizer.json")
    out = tmp_path / "hf"
    res = run_cli(
        [str(BIN / "megalite-convert"), "to-hf", str(ckpt), str(out)], env=OFFLINE, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.LlamaForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager"
    ).eval()
    ours, _ = load_for_inference(ckpt)
    x = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(logits(hf, x), logits(ours, x), **TOL)

    ours_tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "To be, or not to be: that is the question.\nROMEO. Wherefore art thou"
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text).ids
    eos = ours_tok.token_to_id("<|endoftext|>")
    assert hf_tok.eos_token_id == hf.config.eos_token_id == eos
    assert hf.generation_config.eos_token_id == eos


def test_round_trip_is_bitwise(tmp_path):
    """HF -> megalite -> HF gives the same tensors bit for bit (fp32, and bf16 with
    --dtype bfloat16), and the same config; megalite -> HF -> megalite gives the same model."""
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        hf = random_hf_llama(tied=False).to(dtype)
        src = tmp_path / f"hf-{name}"
        hf.save_pretrained(src)
        res = import_hf(src, tmp_path / f"ml-{name}")
        model, _ = load_for_inference(res.out)
        back = export_hf(model.state_dict(), res.cfg, tmp_path / f"back-{name}", dtype=name)
        a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
        ca, cb = (
            json.loads((src / "config.json").read_text()),
            json.loads((back / "config.json").read_text()),
        )
        for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "rope_theta",
                    "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
            assert ca[key] == cb[key], key

    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80,
                      tie_embeddings=True, max_seq_len=64)  # fmt: skip
    ckpt = random_checkpoint(tmp_path / "orig", cfg, seed=5)
    orig, _ = load_for_inference(ckpt)
    hf_dir = export_hf(orig.state_dict(), cfg, tmp_path / "hf-tied")
    assert "lm_head.weight" not in load_file(hf_dir / "model.safetensors")
    again, _ = load_for_inference(import_hf(hf_dir, tmp_path / "again").out)
    for (k, p), q in zip(orig.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), k


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head dim 8 and theta 5e5 the four wavelengths are 6.3, 167, 4443 and 118k tokens:
    # over 400 / 4 = 100 (kept), between 100 and 400 (interpolated), over 400 (divided by 4).
    "original_max_position_embeddings": 400,
}


def test_llama3_rope_scaling_imports_and_exports_the_same_model(tmp_path):
    """A Llama 3.1-style checkpoint (rope_scaling llama3) imports to megalite's logits equal to
    transformers', the same weights without the scaling give other logits, and the export's
    config.json carries the scaling back: transformers loads it to the same logits."""
    import dataclasses

    from megalite.model.transformer import build_model

    hf = random_hf_llama(tied=False, rope_scaling=LLAMA3_SCALING, max_position_embeddings=512)
    hf.save_pretrained(tmp_path / "hf")
    res = import_hf(tmp_path / "hf", tmp_path / "ml")
    assert res.cfg.rope_scaling == "llama3"
    assert res.cfg.rope_scaling_params == (4.0, 1.0, 4.0, 400)
    model, _ = load_for_inference(res.out)
    x = torch.randint(0, 97, (3, 60))
    ref = logits(hf, x)
    torch.testing.assert_close(logits(model, x), ref, **TOL)
    plain = build_model(dataclasses.replace(res.cfg, rope_scaling="none"))
    plain.load_state_dict(model.state_dict())
    assert (logits(plain, x) - ref).abs().max() > 1e-2

    back = export_hf(model.state_dict(), res.cfg, tmp_path / "back")
    config = json.loads((back / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3_SCALING
    again = transformers.LlamaForCausalLM.from_pretrained(
        back, local_files_only=True, attn_implementation="eager"
    ).eval()
    torch.testing.assert_close(logits(again, x), ref, **TOL)


def test_llama3_frequency_bands():
    """Each band of the llama3 rule: kept above `high` turns over the original context, divided
    by the factor below `low`, and in between linear in the turns, continuous at both ends."""
    import math

    from megalite.model.layers import llama3_scaled

    original, factor = 1000, 8.0
    turns = torch.tensor([0.5, 1.0, 2.5, 4.0, 9.0])
    inv_freq = turns * 2 * math.pi / original
    got = llama3_scaled(inv_freq, factor, 1.0, 4.0, original) / inv_freq
    s = (2.5 - 1.0) / (4.0 - 1.0)
    want = torch.tensor([1 / factor, 1 / factor, (1 - s) / factor + s, 1.0, 1.0])
    torch.testing.assert_close(got, want)


def test_rope_scaling_is_checked_and_part_of_the_checkpoint_identity(tmp_path):
    from megalite.checkpoint import _model_fields
    from megalite.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.rope_scaling='yarn' is not one of none, llama3"):
        ModelConfig(rope_scaling="yarn")
    with pytest.raises(ConfigError, match=r"model.rope_high_freq_factor=1.0 must exceed"):
        ModelConfig(rope_scaling="llama3", rope_high_freq_factor=1.0)
    ModelConfig(rope_high_freq_factor=1.0)  # ignored unless scaling is on
    plain = _model_fields({"dim": 64})
    assert plain == _model_fields({"dim": 64, "rope_scaling_factor": 32.0})
    assert plain != _model_fields({"dim": 64, "rope_scaling": "llama3"})


def test_export_over_the_shard_size_writes_indexed_shards(tmp_path, capsys):
    """A model over --max-shard-size is written as numbered shards of at most that size (a
    bigger tensor alone) with save_pretrained's index; transformers loads them to megalite's
    logits, and importing them back gives the same weights bit for bit."""
    from safetensors import safe_open

    from megalite.interop.cli import main
    from megalite.interop.llama_hf import parse_size

    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80,
                      max_seq_len=64)  # fmt: skip
    ckpt = random_checkpoint(tmp_path / "orig", cfg, seed=2)
    model, _ = load_for_inference(ckpt)
    limit = 20_000  # the embedding alone is 97 x 48 x 4 = 18,624 bytes
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and not (out / "model.safetensors").exists()
    assert {p.name for p in shards} == set(index["weight_map"].values())
    total = 0
    for path in shards:
        with safe_open(str(path), "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, (path.name, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    hf = transformers.LlamaForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager"
    ).eval()
    x = torch.randint(0, 97, (2, 30))
    torch.testing.assert_close(logits(hf, x), logits(model, x), **TOL)
    again, _ = load_for_inference(import_hf(out, tmp_path / "again").out)
    for (k, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), k
    # Under the limit: one file, as before.
    single = export_hf(model.state_dict(), cfg, tmp_path / "one")
    assert sorted(p.name for p in single.glob("model*")) == ["model.safetensors"]

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000 and parse_size("4096") == 4096
    bad = tmp_path / "bad"
    assert main(["to-hf", str(ckpt), str(bad), "--max-shard-size", "5XB"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "megalite-convert" in line]
    assert len(err) == 1 and "--max-shard-size='5XB' is not a size" in err[0], err
    assert not bad.exists()


# ------------------------------------------------------------------------- RoPE layouts
def meta_apply_rotary_emb(x_BTHD: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's llama/model.py RoPE: adjacent pairs (x[2i], x[2i + 1]) as complex numbers."""
    t, d = x_BTHD.shape[1], x_BTHD.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs_cis = torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), freqs))
    x_c = torch.view_as_complex(x_BTHD.float().reshape(*x_BTHD.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs_cis[None, :, None, :]).flatten(3)


def scores(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor) -> torch.Tensor:
    k_BTHD = k_BTKD.repeat_interleave(q_BTHD.shape[2] // k_BTKD.shape[2], dim=2)
    return torch.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD)


def test_interleaved_rope_weights_permuted_give_the_same_attention_scores():
    """Meta weights under Meta's complex RoPE and the permuted weights under megalite's
    rotate-half RoPE produce the same q.k for every pair of positions (GQA)."""
    torch.manual_seed(0)
    h, k, d, c, t, theta = 4, 2, 16, 32, 11, 5e5
    x = torch.randn(2, t, c)
    wq, wk = torch.randn(h * d, c), torch.randn(k * d, c)
    meta = scores(
        meta_apply_rotary_emb((x @ wq.T).view(2, t, h, d), theta),
        meta_apply_rotary_emb((x @ wk.T).view(2, t, k, d), theta),
    )
    rope = rope_cos_sin(d, t, theta)

    def ours(wq_, wk_):
        q = apply_rope((x @ wq_.T).view(2, t, h, d), rope)
        return scores(q, apply_rope((x @ wk_.T).view(2, t, k, d), rope))

    # Two fp32 computations of the same sums in different orders (complex multiply vs rotate-half;
    # the matmul kernels differ between CPUs, e.g. AVX2 vs AVX-512/AMX): equal to fp32 rounding of
    # the scores' scale, ~1e-7 x (d x c) accumulated terms.
    scale = meta.abs().max().item()
    got = ours(interleaved_to_half(wq, h), interleaved_to_half(wk, k))
    torch.testing.assert_close(got, meta, rtol=1e-5, atol=1e-5 * scale)
    assert not torch.allclose(ours(wq, wk), meta, atol=1e-2)  # the permutation is needed
    assert torch.equal(half_to_interleaved(interleaved_to_half(wq, h), h), wq)


def test_meta_checkpoint_imports_to_the_same_model(tmp_path):
    """A Meta-format dir (params.json + consolidated.00.pth, interleaved wq/wk) of the same
    weights as a transformers model imports to transformers' logits."""
    hf = random_hf_llama(tied=False, intermediate_size=128)
    ours = {megalite_name(k): v for k, v in hf.state_dict().items()}
    for i in range(2):
        ours[f"layers.{i}.attention.wq.weight"] = half_to_interleaved(
            ours[f"layers.{i}.attention.wq.weight"], 6
        )
        ours[f"layers.{i}.attention.wk.weight"] = half_to_interleaved(
            ours[f"layers.{i}.attention.wk.weight"], 2
        )
    src = tmp_path / "meta"
    src.mkdir()
    torch.save({**ours, "rope.freqs": torch.zeros(8)}, src / "consolidated.00.pth")
    params = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=-1, multiple_of=16,
                  ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=5e5)  # fmt: skip
    (src / "params.json").write_text(json.dumps(params))
    res = import_meta(src, tmp_path / "ml", max_seq_len=64)
    assert res.cfg.hidden_dim == 128 and res.cfg.vocab_size == 97
    model, _ = load_for_inference(res.out)
    x = torch.randint(0, 97, (2, 21))
    torch.testing.assert_close(logits(model, x), logits(hf, x), **TOL)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model_type": "mistral"}, r"config.json: model_type='mistral' is not supported"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"rope_scaling=\{'rope_type': 'llama3', 'factor': 8.0\} has rope_type llama3 but "
            r"no 'low_freq_factor'",
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            r"rope_scaling=\{'rope_type': 'linear', 'factor': 2.0\} is not supported; .*llama3",
        ),
        ({"attention_bias": True}, r"attention_bias=True is not supported; .* no bias"),
        ({"mlp_bias": True}, r"mlp_bias=True is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported; .*silu"),
        ({"head_dim": 16}, r"head_dim=16 is not hidden_size / num_attention_heads = 48 / 6"),
        (
            {"intermediate_size": 96},
            r"'model.layers.0.mlp.down_proj.weight' in .* has shape "
            r"\(48, 80\) but config.json implies \(48, 96\)",
        ),  # fmt: skip
        (
            {"num_hidden_layers": 3},
            r"has no 'model.layers.2.self_attn.k_proj.weight', .* and 5 more; a Llama model",
        ),
        ({"num_hidden_layers": 1}, r"'model.layers.1.\S+' in .* is not part of a Llama model"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_unsupported_or_mismatched_configs_are_refused(tmp_path, change, expected):
    src = tmp_path / "hf"
    random_hf_llama(tied=False).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InteropError, match=expected):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_translation_reads_transformers_5_rope_parameters_and_needs_core_fields():
    hf = json.loads(transformers.LlamaConfig(**{"rope_theta": 1.0}).to_json_string())
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert model_config_from_hf(hf).rope_theta == 5e5
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}
    with pytest.raises(InteropError, match=r"rope_parameters=\{'rope_type': 'yarn'"):
        model_config_from_hf(hf)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    del hf["intermediate_size"]
    with pytest.raises(InteropError, match=r"has no 'intermediate_size'; it is not a complete"):
        model_config_from_hf(hf)


def test_missing_files_are_clear_errors_and_one_line_from_the_cli(tmp_path, capsys):
    src = tmp_path / "hf"
    random_hf_llama(tied=False).save_pretrained(src, max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[1].unlink()
    msg = cli_error(["from-hf", str(src), str(tmp_path / "o")])
    assert f"lists '{shards[1]}', which does not exist; download every shard" in msg
    from megalite.interop.cli import main

    assert main(["to-hf", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg == (
        f"megalite-convert: error: checkpoint '{tmp_path / 'nope'}' does not exist; give a "
        "step_N checkpoint dir, a run dir (its newest checkpoint is used) or a megalite-convert "
        "output dir"
    )
    assert not (tmp_path / "o").exists()
    (src / "model.safetensors.index.json").unlink()
    for f in src.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(InteropError, match=r"has no \*.safetensors weight files"):
        import_hf(src, tmp_path / "o")
    (src / "config.json").unlink()
    with pytest.raises(InteropError, match=rf"'{src / 'config.json'}' does not exist"):
        import_hf(src, tmp_path / "o")


def test_untied_model_without_lm_head_and_existing_output_are_refused(tmp_path):
    src = tmp_path / "hf"
    random_hf_llama(tied=False).save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    del sd["lm_head.weight"]
    from safetensors.torch import save_file

    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"has no 'lm_head.weight'.*tie_word_embeddings"):
        import_hf(src, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=6, ffn_dim=80, max_seq_len=64)
    ckpt = random_checkpoint(tmp_path / "ckpt", cfg)
    with pytest.raises(InteropError, match=r"already exists and is not empty; pass --overwrite"):
        export_hf(load_for_inference(ckpt)[0].state_dict(), cfg, tmp_path / "busy")
    export_hf(load_for_inference(ckpt)[0].state_dict(), cfg, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "f").exists()
