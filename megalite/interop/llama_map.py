"""How a Llama checkpoint in Hugging Face or Meta format maps onto megalite's model: pure
functions on names, tensors and config dicts (the files are read and written by llama_hf.py).

Three things differ between a Hugging Face `LlamaForCausalLM` directory and a megalite checkpoint,
and each is handled in one place here:

- **Names** (`HF_NAMES`): megalite keeps Meta's module names (`attention.wq`, `feed_forward.w1`),
  Hugging Face renamed them (`self_attn.q_proj`, `mlp.gate_proj`). One table, used both ways.
- **RoPE layout**: megalite and Hugging Face rotate the pairs (x[i], x[i + D/2]) ("rotate half");
  Meta's original checkpoints rotate adjacent pairs (x[2i], x[2i + 1]) ("interleaved"). The two
  are the same model up to a permutation of each head's rows of wq and wk
  (`interleaved_to_half` / `half_to_interleaved`), applied only when reading a Meta checkpoint.
- **Config** (`model_config_from_hf`, `hf_config_from_model`): field names differ, and Hugging
  Face configs can describe models megalite does not implement (biases, RoPE scaling, other
  activations); those are refused with the field, the value and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch

from megalite.config import ModelConfig
from megalite.errors import InteropError

# megalite module path -> Hugging Face module path. Per-layer entries are relative to
# `layers.{i}.` / `model.layers.{i}.`; the parameter leaf (`.weight`) is the same on both sides.
HF_NAMES: dict[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_FROM_HF = {v: k for k, v in HF_NAMES.items()}
# Buffers some older transformers versions saved with the weights; recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------------- names
def hf_name(name: str) -> str:
    """megalite parameter name -> Hugging Face parameter name."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        mod, leaf = rest.rsplit(".", 1)
        return f"model.layers.{i}.{HF_NAMES[mod]}.{leaf}"
    mod, leaf = name.rsplit(".", 1)
    return f"{HF_NAMES[mod]}.{leaf}"


def megalite_name(name: str) -> str | None:
    """Hugging Face parameter name -> megalite parameter name, or None for a name outside the
    Llama architecture."""
    mod, _, leaf = name.rpartition(".")
    if leaf != "weight":  # every Llama parameter is a weight; biases belong to other models
        return None
    if mod.startswith("model.layers."):
        _, _, i, rest = mod.split(".", 3)
        ours = _FROM_HF.get(rest)
        return f"layers.{i}.{ours}.{leaf}" if ours is not None and i.isdigit() else None
    ours = _FROM_HF.get(mod)
    return f"{ours}.{leaf}" if ours is not None else None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a megalite checkpoint of this config and its shape, from the model itself
    (built on the meta device: no memory, and no second copy of the shape rules)."""
    from megalite.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_tensors(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """A megalite state dict's tensors in Hugging Face names, converted one at a time (an export
    holds one shard's copies at once, not the whole model's). With tied embeddings the output
    weight is left out, as `save_pretrained` does (transformers re-ties `lm_head` on load)."""
    for name, tensor in sd.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        # safetensors needs contiguous tensors; the tied copy (shared memory) is already skipped.
        yield hf_name(name), tensor.detach().to("cpu", dtype).contiguous()


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, where: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama state dict in megalite names, in fp32 (megalite's master weights),
    checked tensor by tensor against the shapes `cfg` implies. `where` maps each HF name to the
    file it came from, for error messages."""
    where = where or {}
    want = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_sd.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        ours = megalite_name(name)
        src = where.get(name, "the checkpoint")
        if ours is None or ours not in want:
            raise InteropError(
                f"tensor {name!r} in {src} is not part of a Llama model with "
                f"num_hidden_layers={cfg.n_layers} (biases, extra layers and other architectures "
                "are not supported); check that config.json matches the weights"
            )
        if cfg.tie_embeddings and ours == "output.weight":
            # transformers ties lm_head to the embedding on load and ignores a saved copy.
            continue
        if tuple(tensor.shape) != want[ours]:
            raise InteropError(
                f"tensor {name!r} in {src} has shape {tuple(tensor.shape)} but config.json "
                f"implies {want[ours]}; the config does not match the weights"
            )
        if not tensor.is_floating_point():
            raise InteropError(
                f"tensor {name!r} in {src} has dtype {tensor.dtype}; quantized checkpoints are "
                "not supported, use an unquantized (float) checkpoint"
            )
        out[ours] = tensor.to(torch.float32)
    if cfg.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    missing = sorted(set(want) - set(out))
    if missing:
        names = ", ".join(repr(hf_name(m)) for m in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise InteropError(
            f"the checkpoint has no {names}{more}; a Llama model with this config.json needs "
            "them (an untied model needs lm_head.weight; set tie_word_embeddings=true only if "
            "the model really shares it)"
        )
    return out


# ---------------------------------------------------------------------------- RoPE layouts
def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a wq / wk weight (n_heads * D, C) from Meta's interleaved RoPE layout, where
    output rows (2i, 2i + 1) of a head form rotation pair i, to the rotate-half layout, where rows
    (i, i + D/2) do. This is the `permute` of transformers' convert_llama_weights_to_hf.py."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------- config
def _fail(src: str, key: str, value: Any, why: str) -> InteropError:
    return InteropError(f"{src}: {key}={value!r} {why}")


def model_config_from_hf(
    hf: dict[str, Any],
    *,
    src: str = "config.json",
    name: str = "imported",
    max_seq_len: int | None = None,
) -> ModelConfig:
    """A ModelConfig for a Hugging Face Llama config.json, refusing every field whose value
    megalite's model does not implement (instead of converting a model that computes something
    else)."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise _fail(
            src,
            "model_type",
            model_type,
            "is not supported; megalite converts Llama models (model_type llama) only",
        )
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise _fail(
            src,
            "architectures",
            archs,
            "has no LlamaForCausalLM; only the causal LM head is supported",
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(src, "hidden_act", act, "is not supported; megalite's SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise _fail(
                src, key, hf[key], "is not supported; megalite's linear layers have no bias"
            )
    # transformers 5 writes `rope_parameters` (rope_type + rope_theta) instead of the two keys.
    rope_key = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    scaling = hf.get(rope_key)
    rope_fields = _rope_scaling_fields(src, rope_key, scaling)
    if hf.get("attention_dropout", 0.0):
        raise _fail(
            src,
            "attention_dropout",
            hf["attention_dropout"],
            "is not supported; megalite trains without dropout, set it to 0.0 to convert anyway",
        )
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in (*required, "intermediate_size") if k not in hf]
    if missing:
        raise InteropError(f"{src} has no {missing[0]!r}; it is not a complete Llama config")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise _fail(
            src,
            "head_dim",
            head_dim,
            f"is not hidden_size / num_attention_heads = "
            f"{dim} / {n_heads}; megalite derives the head dim from them",
        )
    try:
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float((scaling or {}).get("rope_theta") or hf.get("rope_theta", 1e4)),
            **rope_fields,
            max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
            # LlamaConfig's default, which transformers applies when the key is absent.
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except ValueError as e:  # ConfigError from ModelConfig.__post_init__
        raise InteropError(f"{src}: {e}") from e


# Hugging Face's names of the llama3 rope-scaling values -> ModelConfig's.
LLAMA3_ROPE_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_seq_len",
}


def _rope_scaling_fields(src: str, key: str, scaling: dict | None) -> dict[str, Any]:
    """ModelConfig's rope-scaling fields for a Hugging Face `rope_scaling` (or transformers 5
    `rope_parameters`) entry: none, or Llama 3.1's llama3 rule with its four values."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return {}
    if kind != "llama3":
        raise _fail(
            src,
            key,
            scaling,
            "is not supported; megalite's RoPE scaling is Llama 3.1's rule (rope_type llama3) "
            f"only (converting would change the model's outputs); use a checkpoint without {key}",
        )
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise _fail(src, key, scaling, f"has rope_type llama3 but no {missing[0]!r}")
    fields: dict[str, Any] = {"rope_scaling": "llama3"}
    for hf_key, field in LLAMA3_ROPE_KEYS.items():
        cast = int if field == "rope_original_max_seq_len" else float
        fields[field] = cast(scaling[hf_key])
    return fields


def model_config_from_meta(
    params: dict[str, Any],
    *,
    vocab_size: int,
    tied: bool,
    src: str = "params.json",
    name: str = "imported",
    max_seq_len: int = 4096,
) -> ModelConfig:
    """A ModelConfig for Meta's params.json. Meta's FFN-size rule is megalite's (8/3 dim scaled by
    ffn_dim_multiplier, rounded up to multiple_of); the vocabulary size comes from the embedding
    because Llama 2's params.json stores -1."""
    if params.get("use_scaled_rope"):
        raise _fail(
            src,
            "use_scaled_rope",
            True,
            "is not supported from Meta's format, whose params.json does not state the scaling "
            "factor (8 for Llama 3.1, 32 for Llama 3.2 1B/3B); convert the Hugging Face release "
            "of the model, whose config.json does (megalite-convert from-hf)",
        )
    try:
        return ModelConfig(
            name=name,
            vocab_size=vocab_size,
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=max_seq_len,
            tie_embeddings=tied,
        )
    except KeyError as e:
        raise InteropError(f"{src} has no {e.args[0]!r}; it is not a Meta Llama params.json") from e
    except ValueError as e:
        raise InteropError(f"{src}: {e}") from e


def _hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling == "none":
        return None
    return {
        "rope_type": cfg.rope_scaling,
        **{hf_key: getattr(cfg, field) for hf_key, field in LLAMA3_ROPE_KEYS.items()},
    }


def hf_config_from_model(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """The config.json of the Hugging Face Llama that computes what `cfg` computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _hf_rope_scaling(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def model_overrides(cfg: ModelConfig) -> list[str]:
    """`model.<field>=<value>` command-line overrides giving `cfg`'s model (backends excluded:
    they do not change the weights)."""
    skip = {"attention", "norm", "multiple_of", "ffn_dim_multiplier"}
    out = []
    for f in fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        out.append(f"model.{f.name}={'null' if value is None else value}")
    return out


def model_preset_yaml(cfg: ModelConfig, comment: str) -> str:
    """A conf/model/<name>.yaml preset for `megalite-train -cd <dir>/conf model=<name>`."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += ["defaults:", "  - base_model", "  - _self_", ""]
    for item in model_overrides(cfg):
        key, value = item[len("model.") :].split("=", 1)
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"
