"""`megalite-data`: prepare a dataset (text -> MDS shards) and summarize a prepared one.

megalite-data prepare shakespeare --out data/shakespeare --seq-len 128 --vocab-size 4096
megalite-data prepare web/*.jsonl.zst books.parquet --text-field text --gopher --out data/web
megalite-data prepare my_corpus/ --tokenizer cl100k_base.tiktoken --out data/mine --workers 8
megalite-data stats data/shakespeare [--verify] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from megalite.data.common import read_manifest
from megalite.data.filters import GOPHER, FilterOptions
from megalite.data.prepare import PrepareOptions, default_workers, prepare
from megalite.errors import MegaliteError, cli_error

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}


def parse_bytes(text: str) -> int:
    """'64MB', '512KiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64MB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite-data",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="filter, dedup, tokenize, pack and write MDS shards")
    pr.add_argument(
        "inputs",
        nargs="+",
        help=".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files, folders of them, or "
        "'shakespeare' (the embedded demo corpus)",
    )
    pr.add_argument("--out", required=True, help="output dataset dir (the trainer's data.dir)")
    pr.add_argument("--seq-len", type=int, default=128)
    pr.add_argument("--val-fraction", type=float, default=0.05, help="held-out documents")
    pr.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    g = pr.add_argument_group("reading")
    g.add_argument("--text-field", default="text", help="JSON field / parquet column of text")
    g.add_argument(
        "--on-bad-utf8",
        choices=("error", "replace", "skip"),
        default="error",
        help="bytes that are not UTF-8: stop with an error, replace with U+FFFD, or drop the "
        "document",
    )
    g = pr.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training")
    g.add_argument(
        "--tokenizer", help="use this tokenizer.json or tiktoken encoding file instead of training"
    )
    g.add_argument("--tiktoken-pattern", help="pre-tokenization regex of a tiktoken file")
    g.add_argument("--eos-token", default="<|endoftext|>", help="the end-of-document token")
    g.add_argument(
        "--special-tokens",
        default="",
        help="comma-separated special tokens to add besides --eos-token",
    )
    g = pr.add_argument_group("quality filters (Gopher heuristics; all off unless given)")
    g.add_argument("--gopher", action="store_true", help="Gopher's thresholds for all of them")
    g.add_argument("--min-chars", type=int, help="drop documents with fewer non-blank chars (1)")
    g.add_argument("--min-words", type=int)
    g.add_argument("--max-words", type=int)
    g.add_argument("--mean-word-length", type=float, nargs=2, metavar=("MIN", "MAX"))
    g.add_argument("--max-symbol-ratio", type=float, help="(# and ellipses) per word")
    g.add_argument("--max-ellipsis-lines", type=float, help="fraction of lines ending in ...")
    g.add_argument("--max-bullet-lines", type=float, help="fraction of lines starting with •")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    g = pr.add_argument_group("output")
    g.add_argument("--doc-boundaries", action="store_true", help="write a doc_starts column")
    g.add_argument("--compression", default=None, help="shard compression, e.g. zstd")
    g.add_argument("--shard-size", type=parse_bytes, default=1 << 26, help="e.g. 64MB")
    g.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    st = sub.add_parser("stats", help="summarize a prepared dataset")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.add_argument("--verify", action="store_true", help="check every shard's sha1 too")
    return p


def _filters(args: argparse.Namespace) -> FilterOptions:
    f = replace(GOPHER) if args.gopher else FilterOptions()
    if args.min_chars is not None:
        f.min_chars = args.min_chars
    for name in ("min_words", "max_words"):
        if getattr(args, name) is not None:
            setattr(f, name, getattr(args, name))
    if args.mean_word_length is not None:
        f.min_mean_word_length, f.max_mean_word_length = args.mean_word_length
    if args.max_symbol_ratio is not None:
        f.max_symbol_word_ratio = args.max_symbol_ratio
    if args.max_ellipsis_lines is not None:
        f.max_ellipsis_line_fraction = args.max_ellipsis_lines
    if args.max_bullet_lines is not None:
        f.max_bullet_line_fraction = args.max_bullet_lines
    return f


def summary(data_dir: str | Path) -> dict:
    m = read_manifest(data_dir)
    keys = (
        "format",
        "created",
        "inputs",
        "files",
        "bytes_in",
        "documents_in",
        "documents_out",
        "dropped",
        "duplicates_removed",
        "utf8_replaced_documents",
        "documents",
        "tokens",
        "samples",
        "shards",
        "shard_bytes",
        "compression",
        "doc_boundaries",
        "seq_len",
        "vocab_size",
        "eos_token",
        "eos_id",
        "tokenizer",
        "tokenizer_sha256",
        "unigram_val_loss",
        "seconds",
        "mb_per_s",
    )
    return {k: m.get(k) for k in keys}


def _table(data_dir: str, s: dict) -> str:
    def both(d: dict | None, fmt=lambda v: f"{v:,}") -> str:
        d = d or {}
        return ", ".join(f"{k} {fmt(v)}" for k, v in d.items())

    dropped = {k: v for k, v in (s["dropped"] or {}).items() if v}
    tok = s["tokenizer"] or {}
    rows = [
        ("inputs", f"{' '.join(s['inputs'] or [])} ({s['files']} files, "
                   f"{(s['bytes_in'] or 0) / 1e6:.1f} MB)"),
        ("documents", f"{s['documents_in']:,} in -> {s['documents_out']:,} out "
                      f"({both(s['documents'])})"),
        ("dropped", both(dropped) or "none"),
        ("duplicates removed", f"{s['duplicates_removed']:,}"),
        ("tokens", both(s["tokens"])),
        ("samples", f"{both(s['samples'])} of {s['seq_len']}+1 tokens"),
        ("shards", f"{both(s['shards'])} ({both(s['shard_bytes'], lambda v: f'{v / 1e6:.1f} MB')})"
                   f", compression {s['compression'] or 'none'}, doc boundaries "
                   f"{'yes' if s['doc_boundaries'] else 'no'}"),
        ("tokenizer", f"{tok.get('kind')} ({tok.get('source')}), vocab {s['vocab_size']:,}, "
                      f"eos {s['eos_token']!r} = {s['eos_id']}"),
        ("tokenizer sha256", s["tokenizer_sha256"]),
        ("unigram val loss", "n/a" if s["unigram_val_loss"] is None
                             else f"{s['unigram_val_loss']:.4f} nats/token"),
        ("prepared", f"{s['created']} in {s['seconds']} s ({s['mb_per_s']} MB/s)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{data_dir} ({s['format']})"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            specials = [args.eos_token] + [
                t for t in args.special_tokens.split(",") if t and t != args.eos_token
            ]
            m = prepare(
                PrepareOptions(
                    inputs=args.inputs,
                    out=args.out,
                    seq_len=args.seq_len,
                    vocab_size=args.vocab_size,
                    val_fraction=args.val_fraction,
                    tokenizer=args.tokenizer,
                    tiktoken_pattern=args.tiktoken_pattern,
                    eos_token=args.eos_token,
                    special_tokens=specials,
                    text_field=args.text_field,
                    on_bad_utf8=args.on_bad_utf8,
                    filters=_filters(args),
                    dedup=not args.no_dedup,
                    doc_boundaries=args.doc_boundaries,
                    overwrite=args.overwrite,
                    compression=args.compression,
                    shard_size_limit=args.shard_size,
                    seed=args.seed,
                    workers=args.workers,
                    progress=args.progress,
                )
            )
            dropped = sum(m["dropped"].values())
            print(
                f"wrote {args.out}: {m['documents_in']:,} documents in, {dropped:,} filtered, "
                f"{m['duplicates_removed']:,} duplicates; {m['documents']['train']} train / "
                f"{m['documents']['val']} val documents, {m['tokens']['train']:,} / "
                f"{m['tokens']['val']:,} tokens, {m['samples']['train']:,} / "
                f"{m['samples']['val']:,} samples of {m['seq_len']}+1, vocab {m['vocab_size']}, "
                f"unigram val loss {m['unigram_val_loss']} nats ({m['seconds']} s, "
                f"{m['mb_per_s']} MB/s)"
            )
        else:
            s = summary(args.dir)
            if args.verify:
                from megalite.data.streams import verify_shards

                for split in ("train", "val"):
                    if (Path(args.dir) / split).is_dir():
                        verify_shards(Path(args.dir) / split, hashes=True)
                s["verified"] = True
            if args.json:
                print(json.dumps(s, indent=2))
            else:
                print(_table(args.dir, s))
                if args.verify:
                    print("  every shard matches its sha1 in index.json")
    except MegaliteError as e:
        return cli_error("megalite-data", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
