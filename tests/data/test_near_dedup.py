"""Near-duplicate removal (MinHash + LSH) on a corpus with planted near-duplicates built from the
Shakespeare plays: recall and precision, the kept document of each cluster, the record of every
removal, and the parameters in the manifest."""

from __future__ import annotations

import pytest

from megalite.data.dedup import NearDedupOptions, lsh_params, near_duplicates, signature
from megalite.data.prepare import PrepareOptions, prepare
from tests.data.planted import build, removed


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build(tmp_path_factory.mktemp("planted"))


def order(source: str) -> tuple[str, int]:
    path, line = source.rsplit(":", 1)
    return path, int(line)


def test_planted_near_duplicates_found_with_recall_and_precision(planted, tmp_path):
    out = tmp_path / "out"
    m = prepare(
        PrepareOptions(
            inputs=[str(planted.files[0].parent)],
            out=str(out),
            seq_len=32,
            vocab_size=512,
            near_dedup=True,
            near_dedup_threshold=0.3,
            progress=False,
        )
    )
    recs = [r for r in removed(out) if r["stage"] == "near_dedup"]
    same = [r for r in recs if planted.family[r["source"]] == planted.family[r["match"]]]
    recall, precision = len(same) / planted.copies, len(same) / len(recs)
    assert recall >= 0.9 and precision >= 0.95, (recall, precision)
    # One document per cluster is kept, the first in input order; every match is a kept one.
    gone = {r["source"] for r in removed(out)}
    for r in recs:
        assert r["match"] not in gone and order(r["match"]) < order(r["source"])
        assert r["bytes"] > 0
    assert m["near_duplicates_removed"] == len(recs) == m["removed"]["near_dedup"]["documents"]
    assert m["near_dedup"] == {"threshold": 0.3, "ngram": 5, "num_perm": 128, "bands_rows": [42, 3]}
    assert m["documents_out"] == m["documents_in"] - len(gone)
    # Every input byte is either kept or listed as removed (JSON lines, newline included).
    assert m["bytes_kept"] + sum(r["bytes"] for r in removed(out)) == m["bytes_in"]


def test_lsh_parameters_and_the_jaccard_they_target():
    """datasketch's (bands, rows) put the S-curve's steep part at the threshold: a pair at the
    threshold is a candidate far more often than a pair at half of it."""
    for threshold in (0.3, 0.5, 0.8):
        b, r = lsh_params(threshold, 128)
        assert b * r <= 128

        def p(s, b=b, r=r):
            return 1 - (1 - s**r) ** b

        assert p(threshold) > 0.5 > p(threshold / 2)


def test_clusters_keep_the_first_document_whatever_the_order_of_pairs():
    a = "the quick brown fox jumps over the lazy dog near the river bank " * 5
    b = a + "today"
    c = "an entirely different sentence about kings and castles and ghosts " * 5
    sigs = [signature(t, 5, 128) for t in (c, b, a, c)]
    import numpy as np

    dups = near_duplicates(np.stack(sigs), NearDedupOptions(True, 0.8, 5, 128))
    assert dups == {2: 1, 3: 0}
