"""The bad-input suite: each case gets one clear error (naming what is wrong and how to fix it),
a non-zero exit, no traceback, and leaves every existing file as it was.

The entry points run in-process (`megalite.train.run`, `megalite.data.cli.main`) with sys.argv
set as the shell would; a subprocess test elsewhere checks the same path end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_train_overrides


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_train(
    args: list[str], env: dict[str, str] | None = None, monkeypatch=None
) -> tuple[int, str]:
    from megalite import train

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    old = sys.argv
    sys.argv = ["megalite-train", *args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            train.run()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, err.getvalue()


def run_data(args: list[str]) -> tuple[int, str]:
    from megalite.data.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    """A finished run (with checkpoints) and a pristine copy of the dataset to break."""
    from megalite.trainer import Trainer
    from tests.conftest import compose

    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    Trainer(compose(tiny_train_overrides(tiny_data, run, max_steps=2, eval_every=0))).fit()
    return {"root": root, "data": tiny_data, "run": run}


def base(world, run: Path | None = None) -> list[str]:
    return tiny_train_overrides(world["data"], run or world["root"] / "fresh", max_steps=1)


def broken_data(world, name: str, edit) -> Path:
    d = world["root"] / f"data_{name}"
    if not d.exists():
        shutil.copytree(world["data"], d)
        edit(d)
    return d


def _tamper_tokenizer(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|x|>"
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _bad_meta(run: Path) -> None:
    for meta in run.glob("checkpoints/step_*/meta.json"):
        meta.write_text("{not json")


# (id, args builder, expected substrings, env)
TRAIN_CASES = [
    ("unknown-key", lambda w: [*base(w), "train.max_stepz=3"], ["train.max_stepz"], {}),
    ("wrong-type", lambda w: [*base(w), "train.max_steps=many"], ["max_steps", "many"], {}),
    (
        "kv-heads",
        lambda w: [*base(w), "model.n_kv_heads=3"],
        ["model.n_kv_heads=3", "pick n_kv_heads dividing 4"],
        {},
    ),
    (
        "dim-heads",
        lambda w: [*base(w), "model.dim=66"],
        ["model.dim=66 is not divisible by model.n_heads=4"],
        {},
    ),
    (
        "attention",
        lambda w: [*base(w), "model.attention=xformers"],
        ["model.attention='xformers'", "sdpa"],
        {},
    ),
    (
        "precision",
        lambda w: [*base(w), "train.precision=fp8"],
        ["train.precision='fp8'", "bf16"],
        {},
    ),
    ("lr", lambda w: [*base(w), "optim.lr=-1"], ["optim.lr=-1.0 must be > 0"], {}),
    ("betas", lambda w: [*base(w), "optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers"], {}),
    (
        "seq-len",
        lambda w: [*base(w), "data.seq_len=128"],
        ["data.seq_len=128 exceeds model.max_seq_len=64"],
        {},
    ),
    (
        "global-batch",
        lambda w: [*base(w), "train.global_batch_size=7"],
        ["train.global_batch_size=7 does not equal", "set train.global_batch_size=4"],
        {},
    ),
    (
        "single-multirank",
        lambda w: [*base(w), "parallel=single"],
        ["parallel.strategy=single but the world size is 2"],
        {"WORLD_SIZE": "2"},
    ),
    (
        "tp-heads",
        lambda w: [*base(w), "parallel=tp"],
        ["parallel.tp=4 does not divide model.n_kv_heads=2"],
        {"WORLD_SIZE": "4"},
    ),
    (
        "zero-tp",
        lambda w: [*base(w), "parallel=zero3", "parallel.tp=2"],
        ["DeepSpeed ZeRO does not combine with tensor parallelism"],
        {},
    ),
    (
        "degrees",
        lambda w: [*base(w), "parallel=hsdp", "parallel.dp_shard=3"],
        ["does not divide the world size 4"],
        {"WORLD_SIZE": "4"},
    ),
    (
        "flash-attn",
        lambda w: [*base(w), "model.attention=flash_attn"],
        ["model.attention=flash_attn", "pip install megalite[gpu]"],
        {},
    ),
    (
        "fused-tp",
        lambda w: [*base(w), "parallel=fsdp_tp", "parallel.tp=2", "train.loss=fused_linear"],
        ["train.loss=fused_linear does not support a vocab-sharded"],
        {},
    ),
    (
        "wandb-no-key",
        lambda w: [*base(w), "logging.wandb.mode=online"],
        ["logging.wandb.mode=online but no wandb credentials"],
        {},
    ),
    (
        "resume-missing",
        lambda w: [*base(w), f"train.resume={w['root'] / 'nope'}"],
        ["train.resume=", "is not a directory"],
        {},
    ),
    (
        "init-missing",
        lambda w: [*base(w), f"train.init_from={w['root'] / 'nope'}"],
        ["train.init_from=", "is not a directory"],
        {},
    ),
    (
        "data-missing",
        lambda w: [*base(w), f"data.dir={w['root'] / 'nodata'}"],
        ["does not exist; prepare it first: `megalite-data prepare"],
        {},
    ),
    (
        "data-no-manifest",
        lambda w: [
            *base(w),
            f"data.dir={broken_data(w, 'nomani', lambda d: (d / 'manifest.json').unlink())}",
        ],
        ["manifest.json' is missing"],
        {},
    ),
    (
        "data-bad-manifest",
        lambda w: [
            *base(w),
            f"data.dir={broken_data(w, 'badmani', lambda d: (d / 'manifest.json').write_text('{'))}",
        ],
        ["manifest.json' is not valid JSON", "megalite-data prepare"],
        {},
    ),
    (
        "data-seq-len",
        lambda w: [*base(w), "data.seq_len=16"],
        ["data.seq_len=16 but the shards", "set data.seq_len=32"],
        {},
    ),
    (
        "vocab-small",
        lambda w: [*base(w), "model.vocab_size=256"],
        ["has 512 tokens but model.vocab_size=256"],
        {},
    ),
    (
        "tokenizer-tampered",
        lambda w: [*base(w), f"data.dir={broken_data(w, 'tok', _tamper_tokenizer)}"],
        ["does not match the tokenizer_sha256"],
        {},
    ),
    (
        "ckpt-shape",
        lambda w: [*base(w, w["run"]), "model.dim=96", "train.resume=auto"],
        ["different model shape (model.dim: checkpoint 64, config 96)"],
        {},
    ),
    (
        "run-dir-used",
        lambda w: base(w, w["run"]),
        ["already holds a run (checkpoint step_00000002); pass train.resume=auto"],
        {},
    ),
    (
        "run-dir-is-file",
        lambda w: [*base(w), f"train.run_dir={w['data'] / 'manifest.json'}/sub"],
        ["is a file, not a directory"],
        {},
    ),
    (
        "guard-action",
        lambda w: [*base(w), "train.guard.spike_action=explode"],
        ["train.guard.spike_action='explode'"],
        {},
    ),
    (
        "device-cuda",
        lambda w: [*base(w), "train.device=cuda"],
        ["train.device=cuda but CUDA is not available"],
        {},
    ),
    (
        "several-at-once",
        lambda w: [
            *base(w, w["run"]),
            f"data.dir={w['root'] / 'nodata'}",
            "logging.wandb.mode=online",
        ],
        [
            "3 problems found before start",
            "does not exist",
            "already holds a run",
            "no wandb credentials",
        ],
        {},
    ),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(world, case, monkeypatch):
    name, build, expected, env = case
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(world["root"]))  # no ~/.netrc with wandb credentials
    args = build(world)
    before = snapshot(world["run"], world["data"])
    code, err = run_train(args, env, monkeypatch)
    assert code not in (0, None), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    if name != "several-at-once" and name not in ("unknown-key", "wrong-type"):
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert snapshot(world["run"], world["data"]) == before
    assert not (world["root"] / "fresh").exists()


def test_checkpoint_with_corrupt_meta(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    _bad_meta(run)
    # A complete-looking step dir whose meta.json is not JSON: named, not a traceback.
    code, err = run_train(
        [*base(world, run), f"train.resume={next(run.glob('checkpoints/step_*'))}"], {}, monkeypatch
    )
    assert code == 2 and "meta.json' is not valid JSON" in err and "Traceback" not in err


DATA_CASES = [
    (
        "missing-input",
        lambda r: ["prepare", str(r / "nope.txt"), "--out", str(r / "o")],
        "does not exist",
    ),
    (
        "empty-corpus",
        lambda r: ["prepare", str(_file(r / "e.txt", "\n \n")), "--out", str(r / "o")],
        "hold no text",
    ),
    (
        "non-utf8",
        lambda r: ["prepare", str(_file(r / "l.txt", "caf\xe9", "latin-1")), "--out", str(r / "o")],
        "not valid UTF-8",
    ),
    (
        "not-text",
        lambda r: ["prepare", str(_file(r / "x.bin", "x")), "--out", str(r / "o")],
        ".bin",
    ),
    (
        "vocab-too-small",
        lambda r: [
            "prepare",
            str(_file(r / "t.txt", "hello world " * 50)),
            "--out",
            str(r / "o"),
            "--vocab-size",
            "100",
        ],
        "--vocab-size=100",
    ),
    (
        "seq-len-zero",
        lambda r: [
            "prepare",
            str(_file(r / "t.txt", "hello world " * 50)),
            "--out",
            str(r / "o"),
            "--seq-len",
            "0",
        ],
        "--seq-len=0",
    ),
    (
        "bad-tokenizer",
        lambda r: [
            "prepare",
            str(_file(r / "t.txt", "hello world " * 50)),
            "--out",
            str(r / "o"),
            "--tokenizer",
            str(_file(r / "tok.json", "{broken")),
        ],
        "tok.json",
    ),
    ("stats-not-a-dataset", lambda r: ["stats", str(r)], "manifest.json"),
]


def _file(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_bad_input(tmp_path, case):
    _, build, expected = case
    args = build(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_data(args)
    assert code == 2, err
    assert expected in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "o").exists()


def test_existing_dataset_is_not_overwritten(world, tiny_corpus):
    before = snapshot(world["data"])
    code, err = run_data(["prepare", str(tiny_corpus), "--out", str(world["data"])])
    assert code == 2 and "pass --overwrite" in err
    assert snapshot(world["data"]) == before
