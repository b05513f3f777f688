"""`megalite-data`: prepare a dataset (text -> MDS shards) and summarize a prepared one.

megalite-data prepare shakespeare --out data/shakespeare --seq-len 128 --vocab-size 4096
megalite-data prepare web/*.jsonl.zst books.parquet --text-field text --gopher --out data/web
megalite-data prepare my_corpus/ --tokenizer cl100k_base.tiktoken --out data/mine --workers 8
megalite-data prepare web/ --near-dedup --pii --languages en --decontaminate evals/ --out data/web
megalite-data prepare web/ --tasks 64 --executor slurm --partition cpu --out /shared/data/web
megalite-data train-quality --positive wiki/ --negative spam/ --out quality.bin
megalite-data report data/web                     # removed per stage: table + removed.png
megalite-data mixture data/a=0.7 data/b=0.3 --tokens 2e9   # effective tokens per source
megalite-data stats data/shakespeare [--verify] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from megalite.data.common import read_manifest
from megalite.data.prepare import default_workers
from megalite.data.prepare_cli import add_stage_flags, add_task_flags, run_prepare
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
    S = argparse.SUPPRESS  # unset flags stay unset: --config and the defaults fill them
    pr.add_argument(
        "inputs",
        nargs="*",
        default=S,
        help=".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files, folders of them, or "
        "'shakespeare' (the embedded demo corpus)",
    )
    pr.add_argument("--config", help="a YAML file of prepare options (the names below, with _)")
    pr.add_argument("--out", default=S, help="output dataset dir (the trainer's data.dir)")
    pr.add_argument(
        "--seq-len",
        type=int,
        default=S,
        help="tokens per training sample, packed as seq_len + 1; the trainer's data.seq_len (128)",
    )
    pr.add_argument("--val-fraction", type=float, default=S, help="held-out documents (0.05)")
    pr.add_argument("--seed", type=int, default=S, help="seed of the train/val split")
    g = pr.add_argument_group("reading")
    g.add_argument("--text-field", default=S, help="JSON field / parquet column of text")
    g.add_argument(
        "--on-bad-utf8",
        choices=("error", "replace", "skip"),
        default=S,
        help="bytes that are not UTF-8: stop with an error (default), replace with U+FFFD, or "
        "drop the document",
    )
    g = pr.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=S, help="BPE vocabulary when training")
    g.add_argument(
        "--tokenizer",
        default=S,
        help="use this tokenizer.json or tiktoken encoding file instead of training",
    )
    g.add_argument(
        "--tiktoken-pattern", default=S, help="pre-tokenization regex of a tiktoken file"
    )
    g.add_argument("--eos-token", default=S, help="the end-of-document token")
    g.add_argument(
        "--special-tokens",
        default=S,
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
    add_stage_flags(pr)
    g = pr.add_argument_group("output")
    g.add_argument("--doc-boundaries", action="store_true", default=S, help="doc_starts column")
    g.add_argument("--compression", default=S, help="shard compression, e.g. zstd")
    g.add_argument("--shard-size", type=parse_bytes, default=S, help="e.g. 64MB")
    g.add_argument(
        "--workers", type=int, default=S, help=f"processes per task ({default_workers()})"
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="progress bars (default: when stderr is a terminal)",
    )
    g.add_argument("--overwrite", action="store_true", default=S, help="replace --out")
    add_task_flags(pr)
    st = sub.add_parser("stats", help="summarize a prepared dataset")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.add_argument("--verify", action="store_true", help="check every shard's sha1 too")
    tq = sub.add_parser("train-quality", help="train the fastText quality classifier")
    tq.add_argument("--positive", nargs="+", required=True, help="high-quality documents")
    tq.add_argument("--negative", nargs="+", required=True, help="low-quality documents")
    tq.add_argument("--out", required=True, help="the model file to write, e.g. quality.bin")
    tq.add_argument("--epochs", type=int, default=10)
    tq.add_argument("--text-field", default="text", help="JSON field of the text")
    rp = sub.add_parser("report", help="what prepare removed, per stage: table + bar plot")
    rp.add_argument("dir")
    rp.add_argument("--plot", help="where to write the bar plot (<dir>/removed.png)")
    mx = sub.add_parser("mixture", help="effective tokens and epochs per source of a mixture")
    mx.add_argument("sources", nargs="+", metavar="DIR=WEIGHT", help="prepared datasets")
    mx.add_argument(
        "--tokens", type=float, help="training tokens in all (default: one pass of all)"
    )
    return p


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
            m = run_prepare(args, argv)
            if m is not None:
                dropped = sum(
                    m["removed"].get(k, {}).get("documents", 0)
                    for k in m["removed"]
                    if k not in ("exact_dedup", "near_dedup")
                )
                print(
                    f"wrote {m['options']['out']}: {m['documents_in']:,} documents in, "
                    f"{dropped:,} filtered, {m['duplicates_removed']:,} duplicates, "
                    f"{m['near_duplicates_removed']:,} near-duplicates; "
                    f"{m['documents']['train']} train / "
                    f"{m['documents']['val']} val documents, {m['tokens']['train']:,} / "
                    f"{m['tokens']['val']:,} tokens, {m['samples']['train']:,} / "
                    f"{m['samples']['val']:,} samples of {m['seq_len']}+1, vocab "
                    f"{m['vocab_size']}, unigram val loss {m['unigram_val_loss']} nats "
                    f"({m['seconds']} s, {m['mb_per_s']} MB/s)"
                )  # fmt: skip
        elif args.command == "train-quality":
            from megalite.data.quality import train_quality

            meta = train_quality(
                args.positive, args.negative, args.out, args.epochs, text_field=args.text_field
            )
            print(
                f"wrote {args.out} ({meta['documents']['positive']} positive, "
                f"{meta['documents']['negative']} negative documents; held-out accuracy "
                f"{meta['heldout_accuracy']}; sha256 {meta['sha256'][:12]})"
            )
        elif args.command == "report":
            from megalite.data.removed import report

            table, plot = report(args.dir, args.plot)
            print(table)
            print(f"\nbar plot: {plot}")
        elif args.command == "mixture":
            from megalite.data.mixture import mixture_table, parse_sources

            print(mixture_table(parse_sources(args.sources), args.tokens))
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
