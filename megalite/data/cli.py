"""`megalite-data`: prepare a dataset (text -> MDS shards) and print a prepared dataset's stats.

megalite-data prepare shakespeare --out data/shakespeare --seq-len 128 --vocab-size 4096
megalite-data prepare my_corpus/ notes.txt --out data/mine --tokenizer tokenizer.json
megalite-data stats data/shakespeare
"""

from __future__ import annotations

import argparse
import json
import sys

from megalite.data.prepare import DataError, PrepareOptions, prepare, read_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="tokenize, pack and write MDS shards")
    pr.add_argument("inputs", nargs="+", help=".txt files, folders of them, or 'shakespeare'")
    pr.add_argument("--out", required=True, help="output dataset dir (the trainer's data.dir)")
    pr.add_argument("--seq-len", type=int, default=128)
    pr.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training")
    pr.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.add_argument("--min-chars", type=int, default=1, help="drop shorter documents")
    pr.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    st = sub.add_parser("stats", help="print the manifest summary of a prepared dataset")
    st.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            m = prepare(
                PrepareOptions(
                    inputs=args.inputs,
                    out=args.out,
                    seq_len=args.seq_len,
                    vocab_size=args.vocab_size,
                    tokenizer=args.tokenizer,
                    val_fraction=args.val_fraction,
                    min_chars=args.min_chars,
                    compression=args.compression,
                    seed=args.seed,
                    overwrite=args.overwrite,
                )
            )
            print(
                f"wrote {args.out}: {m['documents']['train']} train / {m['documents']['val']} "
                f"val documents, {m['tokens']['train']:,} / {m['tokens']['val']:,} tokens, "
                f"{m['samples']['train']:,} / {m['samples']['val']:,} samples of "
                f"{m['seq_len']}+1, vocab {m['vocab_size']}, unigram val loss "
                f"{m['unigram_val_loss']} nats ({m['seconds']} s)"
            )
        else:
            m = read_manifest(args.dir)
            keys = (
                "documents_in",
                "documents_out",
                "documents",
                "tokens",
                "samples",
                "seq_len",
                "vocab_size",
                "tokenizer_sha256",
                "unigram_val_loss",
            )
            print(json.dumps({k: m.get(k) for k in keys}, indent=2))
    except DataError as e:
        print(f"megalite-data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
