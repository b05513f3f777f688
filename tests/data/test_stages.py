"""The quality stages of `prepare` through the CLI: language (langid), PII placeholders, the URL
blocklist, decontamination against an eval set, exact duplicates; every removal listed in
removed.jsonl and summed by `megalite-data report`; the fastText quality classifier trained by
`megalite-data train-quality` and applied by `prepare`; options from a `--config` file; bad
input refused naming the file, with nothing already written lost."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from megalite.data.prepare import DataError, PrepareOptions, prepare
from tests.conftest import BIN, run_cli
from tests.data.planted import passages, removed

DATA = str(BIN / "megalite-data")
FRENCH = (
    "Le petit village se trouvait au bord de la rivière, entouré de champs et de forêts. "
    "Chaque matin, les habitants se levaient tôt pour travailler dans les vignes, et le soir "
    "ils se retrouvaient sur la place pour parler de la récolte et du temps qu'il ferait le "
    "lendemain. Les enfants jouaient près de l'église pendant que leurs parents discutaient."
)
PII = (
    "Write to the steward at hamlet.prince@elsinore.dk or call +45 3312 3456 before noon; "
    "the castle's server answers at 192.168.10.20 and at 2001:db8::8a2e:370:7334."
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return passages(("hamlet", "macbeth"), words=120)


def decoded(out: Path) -> str:
    """Every token of both splits, decoded (EOS included)."""
    from streaming import StreamingDataset
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = []
    for split in ("train", "val"):
        ds = StreamingDataset(local=str(out / split), shuffle=False, batch_size=1)
        ids = np.concatenate([ds.get_item(i)["tokens"][:-1] for i in range(ds.num_samples)])
        text.append(tok.decode(ids.tolist(), skip_special_tokens=False))
        del ds
    return "".join(text)


def test_stages_remove_list_and_report(texts, tmp_path):
    docs = [{"text": t, "url": f"https://ok.example.org/{i}"} for i, t in enumerate(texts[:40])]
    docs[3]["url"] = "https://www.spam.example.com/x"  # a subdomain of a blocked domain
    docs.append({"text": FRENCH * 3, "url": "https://fr.example.org/"})
    docs.append({"text": texts[7], "url": "https://copy.example.org/"})  # an exact duplicate
    docs.append({"text": f"{texts[41]}\n\n{PII}", "url": "https://ok.example.org/pii"})
    corpus = write_jsonl(tmp_path / "web.jsonl", docs)
    (tmp_path / "evals").mkdir()
    question = " ".join(texts[20].split()[30:45])  # 15 words from a training document
    write_jsonl(tmp_path / "evals" / "qa.jsonl", [{"text": "unrelated words"}, {"text": question}])
    (tmp_path / "block.txt").write_text("# spam\nspam.example.com\nhttps://other.example.net/a\n")
    out = tmp_path / "out"
    res = run_cli(
        [
            DATA, "prepare", str(corpus), "--out", str(out), "--seq-len", "32",
            "--vocab-size", "512", "--languages", "en", "--language-threshold", "0.9", "--pii",
            "--blocklist", str(tmp_path / "block.txt"), "--decontaminate",
            str(tmp_path / "evals"), "--near-dedup", "--workers", "1", "--progress",
        ],
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    for bar in ("scan task 0/1", "near-dedup (LSH)", "train tokenizer", "tokenize + pack"):
        assert bar in res.stderr  # --progress draws the bars off a terminal too
    by_stage = {r["stage"]: r for r in removed(out)}
    assert sorted(by_stage) == ["blocklist", "decontamination", "exact_dedup", "language"]
    assert by_stage["blocklist"] == {
        "source": f"{corpus}:4",
        "stage": "blocklist",
        "reason": "domain spam.example.com",
        "bytes": len(json.dumps(docs[3]).encode()) + 1,
        "match": f"{tmp_path / 'block.txt'}:2",
    }
    assert by_stage["decontamination"]["source"] == f"{corpus}:21"
    assert by_stage["decontamination"]["match"] == f"{tmp_path / 'evals' / 'qa.jsonl'}:2"
    assert by_stage["language"]["source"] == f"{corpus}:41"
    assert by_stage["language"]["reason"].startswith("fr ")
    assert by_stage["exact_dedup"]["match"] == f"{corpus}:8"
    m = json.loads((out / "manifest.json").read_text())
    assert m["pii_replaced"] == {"email": 1, "ip": 2, "phone": 1}
    assert m["decontamination"]["documents_removed"] == 1
    text = decoded(out)
    assert "<EMAIL_ADDRESS>" in text and "<PHONE_NUMBER>" in text and "<IP_ADDRESS>" in text
    assert "elsinore.dk" not in text and "192.168" not in text and "3312" not in text

    res = run_cli([DATA, "report", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {line.split("|")[1].strip(): line for line in res.stdout.splitlines() if "|" in line}
    assert rows["blocklist"].split("|")[2].strip() == "1"
    assert rows["**kept**"].split("|")[2].strip() == str(m["documents_out"]) == str(len(docs) - 4)
    assert (out / "removed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def spam(rng: random.Random) -> str:
    words = "buy cheap pills now click here free winner casino bonus $$$ !!! deal".split()
    return " ".join(rng.choice(words) for _ in range(rng.randrange(60, 120)))


def test_quality_classifier_trained_applied_and_versioned(texts, tmp_path):
    rng = random.Random(0)
    for name, items in (("pos", texts[:40]), ("neg", [spam(rng) for _ in range(40)])):
        (tmp_path / name).mkdir()
        for i, t in enumerate(items):
            (tmp_path / name / f"{i:03d}.txt").write_text(t)
    model = tmp_path / "quality.bin"
    res = run_cli(
        [DATA, "train-quality", "--positive", str(tmp_path / "pos"), "--negative",
         str(tmp_path / "neg"), "--out", str(model)],
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads(Path(f"{model}.json").read_text())
    assert meta["documents"] == {"positive": 40, "negative": 40}
    assert meta["heldout_accuracy"] >= 0.9
    mixed = [{"text": t} for t in texts[40:60]] + [{"text": spam(rng)} for _ in range(10)]
    corpus = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    out = tmp_path / "out"
    m = prepare(
        PrepareOptions(
            inputs=[str(corpus)], out=str(out), seq_len=32, vocab_size=512,
            quality_model=str(model), progress=False,
        )
    )  # fmt: skip
    gone = {r["source"] for r in removed(out) if r["stage"] == "quality"}
    assert gone == {f"{corpus}:{i}" for i in range(21, 31)}
    sha = meta["sha256"]
    assert m["quality_model"]["sha256"] == sha and (out / f"quality-{sha[:12]}.bin").is_file()
    assert (out / f"quality-{sha[:12]}.bin").read_bytes() == model.read_bytes()


def test_config_file_uses_the_option_names(texts, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[:12]])
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"inputs: [{corpus}]\nseq_len: 32\nvocab_size: 512\nnear_dedup: true\n"
        "near_dedup_threshold: 0.5\nfilters:\n  min_words: 5\n"
    )
    out = tmp_path / "out"
    res = run_cli([DATA, "prepare", "--config", str(config), "--out", str(out), "--seq-len", "16"])
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["near_dedup"]["threshold"] == 0.5 and m["seq_len"] == 16  # the command line wins
    assert m["options"]["filters"]["min_words"] == 5
    config.write_text("near_dedup_treshold: 0.5\n")
    res = run_cli([DATA, "prepare", str(corpus), "--config", str(config), "--out", str(out)])
    assert res.returncode == 2 and "near_dedup_treshold" in res.stderr
    assert str(config) in res.stderr


def _unreadable(d: Path) -> list[str]:
    """A file every read of fails (EIO), even for root: /proc/self/mem at offset 0."""
    (d / "mem.txt").symlink_to("/proc/self/mem")
    return [str(d / "mem.txt")]


def _corrupt_gz(d: Path) -> list[str]:
    (d / "x.jsonl.gz").write_bytes(b"this is not gzip")
    return [str(d / "x.jsonl.gz")]


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda d: {"inputs": _corrupt_gz(d)}, r"x.jsonl.gz' is not a valid gz file"),
        (lambda d: {"inputs": _unreadable(d)}, r"mem.txt' cannot be read \(Input/output error\)"),
        (
            lambda d: {"blocklist": str(_w(d / "b.txt", "ok.com\nnot a domain!\n"))},
            r"--blocklist .*b.txt:2: 'not a domain!' is not a domain",
        ),
        (
            lambda d: {"decontaminate": [str(_w(d / "ev.txt", "abc\0\1\2"))]},
            r"eval set .*ev.txt' holds NUL bytes: it is not text",
        ),
        (
            lambda d: {"decontaminate": [str(_w(d / "ev.bin", "x"))]},
            r"eval set: input .*ev.bin' is not a supported file type",
        ),
        (
            lambda d: {"quality_model": str(_w(d / "q.bin", "junk"))},
            r"--quality-model .*q.bin' is not a fastText model",
        ),
        (lambda d: {"languages": ["xx"]}, r"--languages xx: \['xx'\] not among langid"),
        (lambda d: {"near_dedup": True, "near_dedup_threshold": 1.5}, r"threshold=1.5 must be"),
    ],
)
def test_bad_input_is_one_clear_error_and_nothing_is_lost(texts, tmp_path, extra, message):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[:6]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")  # an existing dataset, asked to be replaced
    options = {"inputs": [str(corpus)], **extra(tmp_path)}
    with pytest.raises(DataError, match=message):
        prepare(PrepareOptions(out=str(out), overwrite=True, progress=False, **options))
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _w(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, scrubbed, counts",
    [
        ("mail j.doe+x@mail.example.co.uk now", "mail <EMAIL_ADDRESS> now", (1, 0, 0)),
        (
            "at 10.0.0.255 not 999.1.1.1 or v1.2.3.4",
            "at <IP_ADDRESS> not 999.1.1.1 or v1.2.3.4",
            (0, 1, 0),
        ),
        ("fe80::1ff:fe23:4567:890a at 10:30:00", "<IP_ADDRESS> at 10:30:00", (0, 1, 0)),
        ("+1 (555) 123-4567, 020 7946 0958", "<PHONE_NUMBER>, <PHONE_NUMBER>", (0, 0, 2)),
        (
            "on 2024-05-01, in 1999, act 3 scene 2",
            "on 2024-05-01, in 1999, act 3 scene 2",
            (0, 0, 0),
        ),
    ],
)
def test_pii_placeholders_and_counts(text, scrubbed, counts):
    from megalite.data.pii import scrub

    out, n = scrub(text)
    assert out == scrubbed and (n["email"], n["ip"], n["phone"]) == counts


def test_mixture_effective_tokens_and_epochs(tmp_path):
    from megalite.data.common import FORMAT
    from megalite.data.mixture import effective_tokens, mixture_table, parse_sources

    for name, tokens in (("a", 1000), ("b", 4000)):
        (tmp_path / name).mkdir()
        manifest = {"format": FORMAT, "tokens": {"train": tokens, "val": 10}}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    sources = parse_sources([f"{tmp_path / 'a'}=3", f"{tmp_path / 'b'}=1"])
    a, b = effective_tokens(sources, tokens=8000)
    assert (a.weight, a.effective, a.epochs) == (0.75, 6000, 6.0)
    assert (b.weight, b.effective, b.epochs) == (0.25, 2000, 0.5)
    one_pass = effective_tokens(parse_sources([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert [s.epochs for s in one_pass] == [1.0, 1.0]
    assert "| 6,000 | 6.00 |" in mixture_table(sources, 8000)
    with pytest.raises(DataError, match="weight 'x' is not a number"):
        parse_sources([f"{tmp_path / 'a'}=x"])
