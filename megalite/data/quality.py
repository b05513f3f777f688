"""Language identification and the fastText quality classifier.

Language: langid.py (`langid==1.1.6`, whose naive-Bayes model over 97 languages ships inside the
package, so nothing is downloaded at run time) with normalized probabilities. A document is kept
when its most likely language is one of `languages` with probability >= `language_threshold`.

Quality: `megalite-data train-quality --positive DIR --negative DIR --out quality.bin` trains a
supervised fastText classifier (word bigrams, one thread so the model is reproducible) on
documents labelled high quality (`__label__hq`) and low quality (`__label__lq`), prints its
held-out accuracy and writes `<out>.json` beside the model (hash, counts, options). `prepare
--quality-model quality.bin` keeps documents whose P(hq) >= `quality_threshold` and copies the
model next to the manifest as `quality-<sha256[:12]>.bin`, its hash recorded in the manifest.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megalite.data.common import DataError, file_sha256

HQ, LQ = "__label__hq", "__label__lq"
HOLDOUT = 0.1


@dataclass
class ClassifierOptions:
    """Language and quality filters of `prepare` (all off by default)."""

    languages: list[str] | None = None  # ISO 639-1 codes, e.g. ["en"]
    language_threshold: float = 0.5
    quality_model: str | None = None  # a model from `megalite-data train-quality`
    quality_threshold: float = 0.5

    def validate(self) -> None:
        if self.languages is not None:
            known = set(language_identifier().nb_classes)
            unknown = [code for code in self.languages if code not in known]
            if unknown or not self.languages:
                raise DataError(
                    f"--languages {','.join(self.languages)}: {unknown or 'empty'} not among "
                    f"langid's languages ({', '.join(sorted(known))})"
                )
        for name in ("language_threshold", "quality_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataError(
                    f"--{name.replace('_', '-')}={value} is a probability; give a value in [0, 1]"
                )
        if self.quality_model is not None:
            load_quality_model(self.quality_model)


_IDENTIFIER = None


def language_identifier():
    """langid's identifier with probabilities normalized to [0, 1] (loaded once per process)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model

        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


def language(text: str) -> tuple[str, float]:
    lang, prob = language_identifier().classify(text)
    return lang, float(prob)


def load_quality_model(path: str):
    import fasttext

    if not Path(path).is_file():
        raise DataError(
            f"--quality-model {path!r} does not exist; train one with `megalite-data "
            "train-quality --positive DIR --negative DIR --out quality.bin`"
        )
    try:
        model = fasttext.load_model(str(path))
    except ValueError as e:
        raise DataError(
            f"--quality-model {path!r} is not a fastText model ({e}); train one with "
            "`megalite-data train-quality`"
        ) from e
    if set(model.get_labels()) != {HQ, LQ}:
        raise DataError(
            f"--quality-model {path!r} has labels {model.get_labels()}, not {HQ} / {LQ}; "
            "train it with `megalite-data train-quality`"
        )
    return model


def quality_score(model, text: str) -> float:
    """P(high quality) of the document."""
    labels, probs = model.predict(" ".join(text.split()), k=2)
    return float(dict(zip(labels, probs)).get(HQ, 0.0))


def versioned_name(sha256: str) -> str:
    return f"quality-{sha256[:12]}.bin"


# -------------------------------------------------------------------------------- training
def _texts(dirs: list[str], flag: str, text_field: str) -> list[str]:
    from megalite.data.readers import decode, discover, iter_raw

    try:
        files, _ = discover(dirs, text_field)
        texts = []
        for doc, _ in iter_raw(files, text_field):
            text, _ = decode(doc, text_field, "error")
            if text and text.strip():
                texts.append(" ".join(text.split()))
    except DataError as e:
        raise DataError(f"{flag}: {e}") from e
    if not texts:
        raise DataError(f"{flag} {dirs} holds no text; give folders of .txt / .jsonl documents")
    return texts


def train_quality(
    positive: list[str],
    negative: list[str],
    out: str,
    epochs: int = 10,
    lr: float = 0.5,
    dim: int = 64,
    word_ngrams: int = 2,
    seed: int = 0,
    text_field: str = "text",
) -> dict:
    """Trains the classifier, writes `out` and `out.json`; returns the metadata."""
    import fasttext

    if Path(out).exists():
        raise DataError(f"--out {out!r} already exists; choose another path or remove it")
    pos = _texts(positive, "--positive", text_field)
    neg = _texts(negative, "--negative", text_field)
    rows = [f"{HQ} {t}" for t in pos] + [f"{LQ} {t}" for t in neg]
    random.Random(seed).shuffle(rows)
    n_hold = int(len(rows) * HOLDOUT) if len(rows) >= 20 else 0
    held, train = rows[:n_hold], rows[n_hold:]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(train) + "\n")
    try:
        model = fasttext.train_supervised(
            input=f.name,
            epoch=epochs,
            lr=lr,
            dim=dim,
            wordNgrams=word_ngrams,
            thread=1,  # one thread: the same data gives the same model
            seed=seed,
            verbose=0,
        )
    finally:
        os.unlink(f.name)
    accuracy = None
    if held:
        hits = sum(model.predict(r.split(" ", 1)[1])[0][0] == r.split(" ", 1)[0] for r in held)
        accuracy = round(hits / len(held), 4)
    tmp = f"{out}.tmp-{os.getpid()}"
    model.save_model(tmp)
    os.replace(tmp, out)
    meta = {
        "format": "megalite-quality-v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": file_sha256(out),
        "labels": [HQ, LQ],
        "documents": {"positive": len(pos), "negative": len(neg)},
        "heldout_documents": len(held),
        "heldout_accuracy": accuracy,
        "options": {
            "positive": positive,
            "negative": negative,
            **asdict(_Hyper(epochs, lr, dim, word_ngrams, seed)),
        },
    }
    Path(f"{out}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class _Hyper:
    epochs: int
    lr: float
    dim: int
    word_ngrams: int
    seed: int
