"""Llama checkpoints in and out of megalite: Hugging Face and Meta formats.

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

A converted checkpoint is a directory `train.init_from`, `megalite-eval` and `megalite-generate`
accept, laid out like one the trainer writes (DCP files holding {"model": state_dict} and a
meta.json whose "model" entry is the full ModelConfig), plus the source's tokenizer files and a
Hydra model preset under conf/model/ so training uses exactly the imported shape.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from megalite.config import ModelConfig

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
# Files copied verbatim from a Hugging Face dir on import (those that exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InteropError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or field, the value and
    what to do."""


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


def to_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A megalite state dict in Hugging Face names. With tied embeddings the output weight is
    left out, as `save_pretrained` does (transformers re-ties `lm_head` on load)."""
    out = {}
    for name, tensor in sd.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        # safetensors needs contiguous tensors; the tied copy (shared memory) is already skipped.
        out[hf_name(name)] = tensor.detach().to("cpu", dtype).contiguous()
    return out


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
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) != "default":
        raise _fail(
            src,
            rope_key,
            scaling,
            "is not supported; megalite's RoPE has no frequency scaling (converting would change "
            f"the model's outputs); use a checkpoint without {rope_key}",
        )
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
            max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
            # LlamaConfig's default, which transformers applies when the key is absent.
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except ValueError as e:  # ConfigError from ModelConfig.__post_init__
        raise InteropError(f"{src}: {e}") from e


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
            "is not supported; megalite's RoPE has no "
            "frequency scaling (converting would change the model's outputs)",
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
        "rope_scaling": None,
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


# ----------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InteropError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{str(path)!r} is not valid JSON ({e})") from e


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model dir: those of the sharded index when there
    is one, else model.safetensors (or every *.safetensors)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InteropError(f"{str(index)!r} has no weight_map; re-save the model")
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InteropError(
                f"{str(index)!r} lists {missing[0]!r}, which does not exist; download every shard"
            )
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    if list(hf_dir.glob("pytorch_model*.bin")):
        raise InteropError(
            f"{str(hf_dir)!r} holds pytorch_model*.bin weights only; convert them to safetensors "
            "first: LlamaForCausalLM.from_pretrained(dir).save_pretrained(out)"
        )
    raise InteropError(f"{str(hf_dir)!r} has no *.safetensors weight files")


def read_hf_dir(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config.json, state dict, {tensor name: file name}) of a Hugging Face Llama dir."""
    from safetensors import safe_open

    if not hf_dir.is_dir():
        raise InteropError(f"{str(hf_dir)!r} is not a directory; give a Hugging Face model dir")
    config = _read_json(hf_dir / "config.json")
    sd: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in hf_weight_files(hf_dir):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key in sd:
                        raise InteropError(f"tensor {key!r} is in both {where[key]} and {f.name}")
                    sd[key] = fh.get_tensor(key)
                    where[key] = f.name
        except InteropError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise InteropError(f"{str(f)!r} is not a readable safetensors file ({e})") from e
    return config, sd, where


# ------------------------------------------------------------------------------ writing
def _staging_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InteropError(
            f"output {str(out)!r} already exists and is not empty; pass --overwrite to replace "
            "it, or choose another output dir"
        )
    tmp = out.parent / f".{out.name}.tmp-{int(time.time() * 1e6)}"
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished staging dir into place, so `out` is never half-written."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{int(time.time() * 1e6)}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def write_checkpoint(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, extra_meta: dict[str, Any]
) -> None:
    """A megalite checkpoint dir from a megalite-named state dict: DCP files with {"model": sd}
    and meta.json (step 0), what `checkpoint.load_model_weights` reads."""
    import torch.distributed.checkpoint as dcp

    want = expected_shapes(cfg)
    assert set(sd) == set(want), sorted(set(sd) ^ set(want))
    with warnings.catch_warnings():
        # Without a process group DCP warns that it saves from a single process: intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": sd}, checkpoint_id=str(out))
    meta = {
        "step": 0,
        "tokens": 0,
        "world_size": 1,
        "engine": "dcp",
        "model": asdict(cfg),
        **extra_meta,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Imported:
    out: Path
    cfg: ModelConfig
    n_params: int


def _write_imported(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out: Path,
    tmp: Path,
    source: dict[str, Any],
    eos_ids: list[int],
    bos_id: int | None,
    copy_from: Path,
) -> Imported:
    """Writes the checkpoint, the source's tokenizer files and the model preset into `tmp`,
    then moves it to `out` (nothing is left behind on failure)."""
    try:
        write_checkpoint(
            sd, cfg, tmp, {"source": source, "eos_token_ids": eos_ids, "bos_token_id": bos_id}
        )
        for name in TOKENIZER_FILES:
            if (copy_from / name).is_file():
                shutil.copy(copy_from / name, tmp / name)
        preset = tmp / "conf" / "model" / f"{cfg.name}.yaml"
        preset.parent.mkdir(parents=True)
        preset.write_text(
            model_preset_yaml(
                cfg,
                f"Written by megalite-convert from {source['path']}.\n"
                f"megalite-train -cd {out}/conf model={cfg.name} train.init_from={out}",
            )
        )
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(
        t.numel() for k, t in sd.items() if not (cfg.tie_embeddings and k == "output.weight")
    )
    return Imported(out=out, cfg=cfg, n_params=n_params)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    max_seq_len: int | None = None,
    overwrite: bool = False,
) -> Imported:
    """Hugging Face Llama dir (config.json + safetensors, sharded or not) -> megalite checkpoint
    dir. The RoPE layouts already agree (both rotate half), so weights are renamed, not permuted."""
    hf_dir, out = Path(hf_dir), Path(out)
    config, hf_sd, where = read_hf_dir(hf_dir)
    cfg = model_config_from_hf(
        config,
        src=str(hf_dir / "config.json"),
        name=_preset_name(name, hf_dir),
        max_seq_len=max_seq_len,
    )
    sd = from_hf_state_dict(hf_sd, cfg, {k: str(hf_dir / v) for k, v in where.items()})
    tmp = _staging_dir(out, overwrite)
    source = {"format": "huggingface-llama", "path": str(hf_dir.resolve())}
    return _write_imported(
        sd,
        cfg,
        out,
        tmp,
        source,
        _token_ids(config.get("eos_token_id")),
        config.get("bos_token_id"),
        hf_dir,
    )


def import_meta(
    meta_dir: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    max_seq_len: int = 4096,
    overwrite: bool = False,
) -> Imported:
    """Meta's original Llama format (params.json + consolidated.00.pth) -> megalite checkpoint
    dir. megalite uses Meta's module names, so only the RoPE layout of wq / wk changes."""
    meta_dir, out = Path(meta_dir), Path(out)
    params = _read_json(meta_dir / "params.json")
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    if not shards:
        raise InteropError(f"{str(meta_dir)!r} has no consolidated.*.pth weight file")
    if len(shards) > 1:
        raise InteropError(
            f"{str(meta_dir)!r} holds {len(shards)} model-parallel shards (consolidated.*.pth); "
            "only single-file Meta checkpoints are supported: convert it with transformers' "
            "convert_llama_weights_to_hf.py and use `megalite-convert from-hf`"
        )
    try:
        sd = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load raises many types for a corrupt or non-tensor file
        raise InteropError(f"{str(shards[0])!r} is not a readable torch checkpoint ({e})") from e
    sd = {k: v for k, v in sd.items() if k != "rope.freqs"}  # a precomputed table, not a weight
    if "tok_embeddings.weight" not in sd:
        raise InteropError(f"{str(shards[0])!r} has no 'tok_embeddings.weight'; not a Llama model")
    cfg = model_config_from_meta(
        params,
        vocab_size=sd["tok_embeddings.weight"].shape[0],
        tied="output.weight" not in sd,
        src=str(meta_dir / "params.json"),
        name=_preset_name(name, meta_dir),
        max_seq_len=max_seq_len,
    )
    # Reuse the Hugging Face path (names, shape checks, dtype): rename, then permute wq / wk.
    hf_sd = {hf_name(k): v for k, v in sd.items() if _is_model_name(k)}
    unknown = sorted(k for k in sd if not _is_model_name(k))
    if unknown:
        raise InteropError(f"tensor {unknown[0]!r} in {str(shards[0])!r} is not a Llama weight")
    ours = from_hf_state_dict(hf_sd, cfg, {k: str(shards[0]) for k in hf_sd})
    for i in range(cfg.n_layers):
        a = f"layers.{i}.attention"
        ours[f"{a}.wq.weight"] = interleaved_to_half(ours[f"{a}.wq.weight"], cfg.n_heads)
        ours[f"{a}.wk.weight"] = interleaved_to_half(ours[f"{a}.wk.weight"], cfg.kv_heads)
    tmp = _staging_dir(out, overwrite)
    source = {"format": "meta-llama", "path": str(meta_dir.resolve())}
    return _write_imported(
        sd=ours,
        cfg=cfg,
        out=out,
        tmp=tmp,
        source=source,
        eos_ids=[],
        bos_id=None,
        copy_from=meta_dir,
    )


def _is_model_name(name: str) -> bool:
    try:
        hf_name(name)
    except (KeyError, ValueError):
        return False
    return True


def _preset_name(name: str | None, src: Path) -> str:
    """A Hydra-friendly preset name (a file name under conf/model/): --name, else the source
    dir's name, with anything but letters, digits, _ and - replaced."""
    name = name or src.resolve().name
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "imported"


def export_hf(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out: str | Path,
    *,
    tokenizer_files: dict[str, str | Path] | None = None,
    extra_files: dict[str, str] | None = None,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """megalite state dict -> Hugging Face dir (config.json, model.safetensors, generation
    config, tokenizer files) that `LlamaForCausalLM.from_pretrained` and `AutoTokenizer` load.
    `tokenizer_files` are copied ({name in out: source path}); `extra_files` are written."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise InteropError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    tmp = _staging_dir(out, overwrite)
    try:
        hf_sd = to_hf_state_dict(sd, cfg, DTYPES[dtype])
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config_from_model(cfg, dtype=dtype, bos_id=bos_id, eos_id=eos_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, src in (tokenizer_files or {}).items():
            shutil.copy(src, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tokenizer_config(eos_token: str | None, bos_token: str | None, max_len: int) -> dict:
    """tokenizer_config.json for a tokenizers-library tokenizer.json: `AutoTokenizer` then
    builds a PreTrainedTokenizerFast that encodes exactly as the tokenizer.json does."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }


def n_params_label(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
