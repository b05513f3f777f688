"""`megalite-convert`: checkpoints into and out of megalite (Llama HF / Meta, DeepSpeed ZeRO).

megalite-convert from-hf path/to/hf_llama converted/             # config.json + *.safetensors
megalite-convert from-meta path/to/Llama-2-7b converted/         # params.json + consolidated.00.pth
megalite-convert to-hf runs/cpu_demo hf_out/ --dtype bfloat16    # newest checkpoint of a run
megalite-convert from-deepspeed runs/z3/checkpoints/step_00000100 z3_step_100/   # zero1/2/3 run

An imported dir is a megalite checkpoint: continue pretraining from it with
`megalite-train -cd converted/conf model=<name> train.init_from=converted/`, or pass it to
megalite-eval / megalite-generate. An exported dir loads with
`transformers.LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, offline.
A converted DeepSpeed checkpoint holds the fp32 model weights: any layout starts from it with
`train.init_from=<dir>` (the optimizer state stays behind).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megalite import cli_args
from megalite.checkpoint import load_for_inference, resolve_checkpoint
from megalite.errors import MegaliteError, cli_error
from megalite.interop.llama_hf import (
    Imported,
    InteropError,
    export_hf,
    import_hf,
    import_meta,
    n_params_label,
    parse_size,
    tokenizer_config,
)
from megalite.interop.llama_map import model_overrides


def _print_imported(res: Imported, src: str) -> None:
    cfg = res.cfg
    print(
        f"megalite-convert: wrote {res.out} from {src}: {n_params_label(res.n_params)} params, "
        f"{cfg.n_layers} layers, "
        f"dim {cfg.dim}, {cfg.n_heads} heads / {cfg.kv_heads} kv heads, vocab {cfg.vocab_size}, "
        f"tied embeddings {cfg.tie_embeddings}"
    )
    print(
        "continue pretraining with:\n"
        f"  megalite-train -cd {res.out}/conf model={cfg.name} train.init_from={res.out} ...\n"
        "or with explicit overrides:\n"
        f"  megalite-train {' '.join(model_overrides(cfg))} train.init_from={res.out} ..."
    )


def to_hf(args: argparse.Namespace) -> Path:
    """Export: loads the checkpoint (any layout) and writes the Hugging Face dir."""
    from megalite.evaluate import eos_ids, find_tokenizer, load_tokenizer, run_data_config

    max_shard_bytes = parse_size(args.max_shard_size)  # before the (slow) checkpoint load
    ckpt = resolve_checkpoint(args.checkpoint)
    model, meta = load_for_inference(ckpt, "cpu")
    cfg = model.cfg
    files: dict[str, str | Path] = {}
    extra: dict[str, str] = {}
    eos: list[int] = list(meta.get("eos_token_ids") or [])
    bos = meta.get("bos_token_id")
    if not args.no_tokenizer:
        run = run_data_config(ckpt)
        tok_path = find_tokenizer(ckpt, args.tokenizer, run)
        tok = load_tokenizer(tok_path)
        if tok.get_vocab_size() > cfg.vocab_size:
            raise InteropError(
                f"tokenizer {str(tok_path)!r} has {tok.get_vocab_size()} tokens but the model's "
                f"vocab_size is {cfg.vocab_size}; pass the tokenizer the model was trained with"
            )
        files["tokenizer.json"] = tok_path
        eos = eos_ids(meta, tok, run)
        # An imported checkpoint carries its source's tokenizer config (chat template, special
        # tokens): keep it. Otherwise describe megalite's tokenizer: EOS separates documents
        # and also starts one (GPT-2's convention), there is no other special token.
        if (ckpt / "tokenizer_config.json").is_file() and tok_path.parent == ckpt:
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (ckpt / name).is_file():
                    files[name] = ckpt / name
        else:
            eos_tok = tok.id_to_token(eos[0]) if eos else None
            bos = eos[0] if eos else None
            tc = tokenizer_config(eos_tok, eos_tok, cfg.max_seq_len)
            extra["tokenizer_config.json"] = json.dumps(tc, indent=2) + "\n"
            special = {"bos_token": eos_tok, "eos_token": eos_tok} if eos_tok else {}
            extra["special_tokens_map.json"] = json.dumps(special, indent=2) + "\n"
    eos_id: int | list[int] | None = eos[0] if len(eos) == 1 else (eos or None)
    out = export_hf(
        model.state_dict(),
        cfg,
        args.out,
        tokenizer_files=files,
        extra_files=extra,
        dtype=args.dtype,
        bos_id=bos,
        eos_id=eos_id,
        overwrite=args.overwrite,
        max_shard_bytes=max_shard_bytes,
    )
    print(
        f"megalite-convert: wrote {out} from {ckpt} (step {meta.get('step')}, {args.dtype}"
        f"{', no tokenizer' if args.no_tokenizer else ''}); load it with "
        f"LlamaForCausalLM.from_pretrained({str(out)!r})"
    )
    return out


def from_deepspeed(args: argparse.Namespace) -> Path:
    """A DeepSpeed ZeRO checkpoint of a zero1/2/3 run -> a DCP checkpoint of its fp32 weights."""
    # DeepSpeed (and its accelerator probing) is imported only for this command.
    from megalite.parallel.deepspeed import convert_to_dcp

    out = Path(args.out)
    meta = convert_to_dcp(Path(args.checkpoint), out)
    print(
        f"megalite-convert: wrote {out} from {args.checkpoint} (DeepSpeed, step "
        f"{meta.get('step')}, fp32 weights); start any layout from it with "
        f"train.init_from={out}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = cli_args.convert().parse_args(argv)
    try:
        if args.command in ("from-hf", "from-meta"):
            importer = import_hf if args.command == "from-hf" else import_meta
            res = importer(
                args.src, args.out, name=args.name, max_seq_len=args.max_seq_len,
                overwrite=args.overwrite,
            )  # fmt: skip
            _print_imported(res, args.src)
        elif args.command == "from-deepspeed":
            from_deepspeed(args)
        else:
            to_hf(args)
    except MegaliteError as e:
        return cli_error("megalite-convert", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
