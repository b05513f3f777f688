"""Llama checkpoints in and out of megalite, as files: a Hugging Face `LlamaForCausalLM` dir
(config.json, safetensors, tokenizer files) or Meta's original consolidated.*.pth + params.json
read, converted (by the mapping of names, RoPE layout and config in llama_map.py) and written.

A converted checkpoint is a directory `train.init_from`, `megalite-eval` and `megalite-generate`
accept, laid out like one the trainer writes (DCP files holding {"model": state_dict} and a
meta.json whose "model" entry is the full ModelConfig), plus the source's tokenizer files and a
Hydra model preset under conf/model/ so training uses exactly the imported shape.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalite.checkpoint import quiet_dcp
from megalite.config import ModelConfig
from megalite.errors import InteropError
from megalite.interop.llama_map import (
    expected_shapes,
    from_hf_state_dict,
    hf_config_from_model,
    hf_name,
    hf_tensors,
    interleaved_to_half,
    model_config_from_hf,
    model_config_from_meta,
    model_preset_yaml,
)
from megalite.rundir import write_meta

# Files copied verbatim from a Hugging Face dir on import (those that exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# save_pretrained's default shard size: 5 GB (decimal, as transformers counts).
MAX_SHARD_BYTES = 5 * 10**9
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB' or a plain number of bytes (transformers' units: KB,
    MB, GB are powers of 10, KiB, MiB, GiB of 2)."""
    t = text.strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            value = float(t[: -len(unit)]) * _SIZE_UNITS[unit]
            break
    else:
        value = float(t) if t.replace(".", "", 1).isdigit() else 0
    if value < 1:
        raise InteropError(
            f"--max-shard-size={text!r} is not a size; give bytes or a number with KB, MB, GB, "
            "KiB, MiB or GiB (e.g. 5GB)"
        )
    return int(value)


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
    with quiet_dcp():
        dcp.save({"model": sd}, checkpoint_id=str(out))
    write_meta(out, step=0, tokens=0, world_size=1, engine="dcp", model=cfg, **extra_meta)


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
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """megalite state dict -> Hugging Face dir (config.json, the weights, generation config,
    tokenizer files) that `LlamaForCausalLM.from_pretrained` and `AutoTokenizer` load.
    `tokenizer_files` are copied ({name in out: source path}); `extra_files` are written. The
    weights are one model.safetensors up to `max_shard_bytes`, else shards
    model-0000i-of-0000N.safetensors of at most that size (a larger tensor alone) with
    model.safetensors.index.json, as `save_pretrained` writes them."""
    if dtype not in DTYPES:
        raise InteropError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    tmp = _staging_dir(out, overwrite)
    try:
        write_safetensors(hf_tensors(sd, cfg, DTYPES[dtype]), tmp, max_shard_bytes)
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


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int
) -> list[Path]:
    """Writes (name, tensor) pairs in order into shards of at most `max_shard_bytes`, holding one
    shard's tensors at a time; one shard is model.safetensors, several are numbered and indexed
    in model.safetensors.index.json. Returns the files written."""
    from safetensors.torch import save_file

    parts: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        path = out / f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        parts.append(path)
        weight_map.update({name: path.name for name in shard})
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if shard or not parts:
        flush()
    if len(parts) == 1:
        return [parts[0].rename(out / "model.safetensors")]
    names = {p.name: f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i, p in
             enumerate(parts, 1)}  # fmt: skip
    final = [p.rename(out / names[p.name]) for p in parts]
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: names[part] for name, part in weight_map.items()},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return final


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
