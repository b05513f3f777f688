"""`megalite-eval`: a run dir means its newest checkpoint, the val-split loss is the one the
trainer reported, text files are windowed like the data pipeline, and bad input is one clear
error."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from megalite.checkpoint import CheckpointError, load_for_inference
from megalite.config import ModelConfig
from megalite.data.common import DataError
from megalite.evaluate import evaluate, main
from megalite.metrics import read_metrics
from tests.conftest import BIN, REPO, compose, run_cli, run_torchrun, tiny_train_overrides
from tests.interop.helpers import random_checkpoint

# Between 33 and 65 tokens with the fixture's tokenizer: two windows of 32, or one of 64.
TEXT = "HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n"


@pytest.fixture(scope="module")
def small_data(tiny_corpus, tmp_path_factory):
    """The tiny corpus cut to 6000 characters per play: a val split of ~100 samples, small
    enough for the trainer to evaluate all of it in the fixture below."""
    from megalite.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("small")
    (root / "corpus").mkdir()
    for f in sorted(tiny_corpus.iterdir()):
        (root / "corpus" / f.name).write_text(f.read_text()[:6000])
    opts = PrepareOptions(
        inputs=[str(root / "corpus")], out=str(root / "data"), seq_len=32, vocab_size=512,
        val_fraction=0.25,
    )  # fmt: skip
    prepare(opts)
    return root / "data"


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 whose final eval covers the whole val
    split (micro-batch 1 and more eval batches than samples: the trainer reads every sample)."""
    from megalite.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    overrides = tiny_train_overrides(
        small_data, run_dir, max_steps=4, ckpt_every=2, keep_last=2, micro_batch_size=1,
        eval_every=0, eval_batches=100_000,
    )  # fmt: skip
    Trainer(compose(overrides)).fit()
    gc.collect()
    return run_dir


def test_run_dir_means_newest_checkpoint_and_matches_the_trainers_val_loss(run):
    val = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [4]
    res = evaluate(run, batch_size=8)
    assert res.step == 4 and res.checkpoint.endswith("step_00000004")
    assert res.loss == pytest.approx(val[0]["val_loss"], rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.loss))
    assert res.tokens == res.samples * 32 and res.samples > 50
    earlier = evaluate(run / "checkpoints" / "step_00000002", batch_size=8, max_batches=3)
    assert earlier.step == 2 and earlier.samples == 24 and earlier.loss != res.loss


def test_text_file_is_tokenized_with_the_runs_tokenizer_and_windowed(run, small_data, tmp_path):
    from tokenizers import Tokenizer

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    tok = Tokenizer.from_file(str(small_data / "tokenizer.json"))
    ids = tok.encode(TEXT).ids + [tok.token_to_id("<|endoftext|>")]
    assert 33 < len(ids) <= 65
    model, _ = load_for_inference(run / "checkpoints" / "step_00000004")
    with torch.no_grad():
        whole = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).item()
    # One window holding the whole text: exactly the model's loss on it.
    res = evaluate(run, text=text, seq_len=64)
    assert (res.tokens, res.samples) == (len(ids) - 1, 1)
    assert res.loss == pytest.approx(whole, rel=1e-6)
    # The run's seq_len (32): two windows, every token a target once, less context.
    res32 = evaluate(run, text=text)
    assert (res32.seq_len, res32.tokens, res32.samples) == (32, len(ids) - 1, 2)
    assert res32.loss != pytest.approx(whole, rel=1e-4)


def test_cli_prints_and_writes_json(run, tmp_path):
    out = tmp_path / "ppl.json"
    res = run_cli([str(BIN / "megalite-eval"), str(run), "--max-batches", "2", "--json", str(out)])
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    ref = evaluate(run, max_batches=2)
    assert got["step"] == 4 and got["tokens"] == 2 * 8 * 32
    assert got["loss"] == pytest.approx(ref.loss, rel=1e-6)
    assert f"loss {ref.loss:.4f} nats/token, perplexity {ref.ppl:.2f}" in res.stdout


def test_bad_input_is_one_line_error(run, tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megalite-eval: error: ")
        return lines[0]

    assert "does not exist; give a step_N checkpoint dir" in error([str(tmp_path / "nope")])
    assert "is neither a checkpoint (no meta.json) nor a run dir" in error([str(tmp_path)])
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    assert "holds no complete checkpoint" in error([str(tmp_path / "r")])
    assert "--text=" in error([str(run), "--text", str(tmp_path / "missing.txt")])
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    conv = random_checkpoint(tmp_path / "conv", cfg)
    msg = error([str(conv)])
    assert "has no run config.yaml naming its data; pass --data-dir DIR" in msg
    msg = error([str(conv), "--text", __file__])
    assert "no tokenizer for checkpoint" in msg and "pass --tokenizer" in msg
    shard = next(conv.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot load the weights of .* damaged, use"):
        load_for_inference(conv)
    (conv / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no .metadata .*: the checkpoint is incomplete"):
        load_for_inference(conv)
    with pytest.raises(DataError, match=r"manifest.json' is missing; is .* a prepared dataset"):
        evaluate(run, data_dir=tmp_path / "r")


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_sharded_checkpoints_evaluate_to_the_val_loss_their_run_logged(small_data, tmp_path):
    """Checkpoints written by 2 ranks under FSDP2 (sharded) and tensor parallelism (DTensor
    shards) load in one process: megalite-eval gives the val_loss each run logged over the same
    (whole) val split."""
    runs = {name: tmp_path / name for name in ("fsdp", "tp")}
    common = dict(max_steps=2, micro_batch_size=1, eval_every=0, eval_batches=100_000)
    cases = [
        [*tiny_train_overrides(small_data, runs["fsdp"], **common), "parallel=fsdp"],
        [*tiny_train_overrides(small_data, runs["tp"], **common), "parallel=tp"],
    ]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    res = run_torchrun(2, [str(REPO / "tests/parallel/driver.py"), str(spec)], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, run_dir in runs.items():
        meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
        assert meta["world_size"] == 2, name
        logged = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
        assert evaluate(run_dir).loss == pytest.approx(logged[-1], rel=1e-5), name
