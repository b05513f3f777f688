"""`megalite-eval harness`: lm-evaluation-harness on a megalite checkpoint gives what lm_eval's own
`hf` backend gives for the same weights (a Hugging Face Llama converted with megalite-convert),
the CLI writes the harness JSON and a markdown table, and bad input is one clear error each.

All offline: the tasks are local YAMLs over JSONL files (tests/harness_tasks); their relative
data_files count from the repository root, so the tests run there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

TASK_DIR = REPO / "tests" / "harness_tasks"
TASKS = ["megalite_tiny_mc", "megalite_tiny_rolling", "megalite_tiny_gen"]
EOS = "<|endoftext|>"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network, as on a cluster's compute nodes; every dataset comes from local files, and
    the datasets cache stays out of $HOME."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path_factory.getbasetemp() / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(REPO)


def build_converted(root: Path) -> tuple[Path, Path]:
    """(a Hugging Face Llama dir with its tokenizer, the megalite checkpoint megalite-convert
    makes of it). A 300-token byte-level BPE trained on the task texts; context 64 tokens, so
    the long rolling document spans several windows."""
    from megalite.data.tokenizer import train_bpe
    from megalite.interop.llama_hf import import_hf
    from tests.interop.helpers import random_hf_llama

    texts = [json.loads(line)["text"] for line in open(TASK_DIR / "data" / "text.jsonl")]
    texts += open(TASK_DIR / "data" / "mc.jsonl").read().splitlines()
    tok = train_bpe(texts, 300, [EOS])
    eos = tok.token_to_id(EOS)
    # No BOS anywhere: both backends then condition empty contexts on EOS.
    hf = random_hf_llama(
        tied=False, vocab_size=300, eos_token_id=eos, bos_token_id=None, pad_token_id=None
    )
    hf_dir, ckpt = root / "hf", root / "ckpt"
    hf.save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS})
    )
    import_hf(hf_dir, ckpt)
    return hf_dir, ckpt


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    return build_converted(tmp_path_factory.mktemp("harness"))


def _samples(results: dict, task: str) -> list:
    return [
        s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
    ]


def test_parity_with_lm_evals_hf_backend(converted):
    """Same tasks, same weights: accuracies identical, every log-likelihood within 1e-4
    relative, greedy generations identical (fp32 on CPU)."""
    pytest.importorskip("accelerate", reason="lm_eval's hf backend imports accelerate")
    from lm_eval import simple_evaluate

    from megalite.harness import MegaliteLM, run_harness, task_manager

    hf_dir, ckpt = converted
    lm = MegaliteLM(ckpt, device="cpu")
    longest = max(
        len(lm.tok_encode(json.loads(line)["text"]))
        for line in open(TASK_DIR / "data" / "text.jsonl")
    )
    assert longest > 2 * lm.max_length  # the rolling task really rolls
    # Batch sizes differ on purpose: padding must not change a score.
    ours = run_harness(
        ckpt, TASKS, include_path=TASK_DIR, device="cpu", batch_size=3, log_samples=True,
        default_tasks=False,
    )  # fmt: skip
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
        tasks=TASKS,
        task_manager=task_manager(str(TASK_DIR), False),
        batch_size=4,
        log_samples=True,
    )
    mc, rolling, gen = TASKS
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][mc][metric] == theirs["results"][mc][metric]
    assert ours["results"][mc]["sample_len"] == 8
    for a, b in zip(_samples(ours, mc), _samples(theirs, mc), strict=True):
        assert [g for _, g in a] == [g for _, g in b]
        assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], rel=1e-4)
    for a, b in zip(_samples(ours, rolling), _samples(theirs, rolling), strict=True):
        assert a[0] == pytest.approx(b[0], rel=1e-4)
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert ours["results"][rolling][metric] == pytest.approx(
            theirs["results"][rolling][metric], rel=1e-4
        )
    assert _samples(ours, gen) == _samples(theirs, gen)
    assert ours["results"][gen]["exact_match,none"] == theirs["results"][gen]["exact_match,none"]


def test_stop_strings_are_found_at_the_token_they_appear_with(converted):
    """generate_until ends a row at the first token after which its text holds a stop string,
    decoding only a tail of the tokens: on token streams with stop strings planted between
    random tokens, that is the same token as decoding everything each time finds, including
    stop strings split over several tokens and multi-byte ones."""
    from megalite.harness import MegaliteLM

    lm = MegaliteLM(converted[1], device="cpu")
    gen = torch.Generator().manual_seed(0)
    stops = ["\n", "es", " the", "e t", "Question:", ", and", " é"]
    found = split = 0
    for stop in stops:
        for filler in ("", "see", "the answer is", "a,b"):
            noise = torch.randint(0, 300, (12,), generator=gen).tolist()
            tokens = noise + lm.tok_encode(f"{filler}{stop}{filler}.") + noise
            check = lm._stop_check([stop])
            n = len(tokens)
            full = next((k for k in range(1, n + 1) if stop in lm.tok_decode(tokens[:k])), None)
            tail = next((k for k in range(1, n + 1) if check(tokens[:k])), None)
            assert tail == full, (stop, filler, tokens)
            found += full is not None
            split += full is not None and stop not in lm.tok_decode(tokens[full - 1 : full])
    assert found == len(stops) * 4
    assert split >= 10  # most planted stop strings span tokens: the newest alone misses them
    assert lm._stop_check([]) is None and lm._stop_check([""]) is None


def test_cli_writes_the_harness_json_and_a_markdown_table(converted, tmp_path, capsys):
    from megalite.evaluate import main

    _, ckpt = converted
    out = tmp_path / "out"
    args = ["harness", str(ckpt), "--tasks", "megalite_tiny_mc,megalite_tiny_rolling",
            "--num-fewshot", "1", "--limit", "3", "--include-path", str(TASK_DIR),
            "--no-default-tasks", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n-shot"]["megalite_tiny_mc"] == 1
    assert results["n-samples"]["megalite_tiny_mc"]["effective"] == 3
    assert 0.0 <= results["results"]["megalite_tiny_mc"]["acc,none"] <= 1.0
    assert results["megalite"]["checkpoint"] == str(ckpt)
    table = (out / "results.md").read_text()
    assert "|megalite_tiny_mc" in table and "bits_per_byte" in table
    assert "wrote" in capsys.readouterr().out


# -------------------------------------------------------------------------------- bad input
def _error(args: list[str], capsys) -> str:
    from megalite.evaluate import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megalite-eval harness: error: "), err
    return err


def test_unknown_task_is_one_error_with_suggestions(converted, capsys):
    _, ckpt = converted
    err = _error(
        ["harness", str(ckpt), "--tasks", "megalite_tiny_mq", "--include-path", str(TASK_DIR),
         "--no-default-tasks"],
        capsys,
    )  # fmt: skip
    assert "unknown harness task 'megalite_tiny_mq'" in err
    assert "did you mean megalite_tiny_mc" in err


def test_task_needing_the_network_offline_is_one_error(converted, tmp_path, capsys):
    """A task whose dataset lives on the Hugging Face Hub, on a machine without network."""
    _, ckpt = converted
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hub = (TASK_DIR / "megalite_tiny_mc.yaml").read_text()
    hub = hub.replace("task: megalite_tiny_mc", "task: hub_task").replace(
        "dataset_path: json", "dataset_path: megalite-tests/no-such-dataset"
    )
    (tasks / "hub_task.yaml").write_text(hub)
    err = _error(
        ["harness", str(ckpt), "--tasks", "hub_task", "--include-path", str(tasks),
         "--no-default-tasks"],
        capsys,
    )  # fmt: skip
    assert "needs its dataset from the Hugging Face Hub and this machine is offline" in err
    assert "--include-path" in err


def test_missing_and_half_written_checkpoints_are_one_error_each(converted, tmp_path, capsys):
    _, ckpt = converted
    base = ["--tasks", "megalite_tiny_mc", "--include-path", str(TASK_DIR), "--no-default-tasks"]
    err = _error(["harness", str(tmp_path / "nope"), *base], capsys)
    assert "does not exist" in err
    # A run dir whose only checkpoint is still being written (step_N.tmp, no meta.json).
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "checkpoints" / "step_00000004.tmp")
    (run / "checkpoints" / "step_00000004.tmp" / "meta.json").unlink()
    err = _error(["harness", str(run), *base], capsys)
    assert "holds no complete checkpoint" in err
    # meta.json written but the DCP index missing.
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / ".metadata").unlink()
    err = _error(["harness", str(broken), *base], capsys)
    assert "no .metadata" in err and "incomplete" in err


@pytest.mark.slow
def test_a_deepspeed_zero3_checkpoint_is_read_directly(tiny_data, tmp_path):
    """A 2-rank ZeRO-3 run's checkpoint, with no conversion step, scores exactly what its
    `megalite-convert from-deepspeed` conversion scores."""
    pytest.importorskip("deepspeed")
    from megalite.harness import run_harness
    from megalite.interop.cli import main as megalite_convert
    from tests.conftest import run_torchrun, tiny_train_overrides

    run = tmp_path / "z3"
    case = [*tiny_train_overrides(tiny_data, run, max_steps=2, ckpt_every=2, micro_batch_size=2),
            "parallel=zero3"]  # fmt: skip
    (tmp_path / "cases.json").write_text(json.dumps([case]))
    res = run_torchrun(2, [str(REPO / "tests/parallel/driver.py"), str(tmp_path / "cases.json")])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000002"
    assert json.loads((ckpt / "meta.json").read_text())["engine"] == "deepspeed"
    assert megalite_convert(["from-deepspeed", str(ckpt), str(tmp_path / "dcp")]) == 0
    kw = dict(include_path=TASK_DIR, default_tasks=False, device="cpu", log_samples=True,
              tokenizer=str(tiny_data / "tokenizer.json"))  # fmt: skip
    direct = run_harness(ckpt, TASKS[:2], **kw)
    converted = run_harness(tmp_path / "dcp", TASKS[:2], **kw)
    for task in TASKS[:2]:
        assert _samples(direct, task) == _samples(converted, task)
        assert direct["results"][task] == converted["results"][task]
