"""Shared fixtures. Sets the environment before anything imports triton, wandb or streaming."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Triton kernels run in the interpreter on CPU; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Each test session gets its own temp dir: mosaicml-streaming leaves file locks in it.
_SESSION_TMP = tempfile.mkdtemp(prefix="megalite-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = _SESSION_TMP
for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    os.environ[var] = os.path.join(_SESSION_TMP, "wandb")
os.environ["WANDB_MODE"] = "disabled"
# The CPU peak cache (megalite.metrics.best_cpu_peak) stays out of $HOME.
os.environ["MEGALITE_CACHE_DIR"] = os.path.join(_SESSION_TMP, "megalite-cache")
os.environ.pop("WANDB_API_KEY", None)

# Every in-process training run leaves a few mosaicml-streaming shared-memory descriptors open
# until exit (megalite.data.shm.release closes most); a session runs ~200 of them.
import resource  # noqa: E402

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and (_hard == resource.RLIM_INFINITY or _soft < _hard):
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(sys.executable).parent

# A small model for tests: every code path of the real one, ~0.2M parameters.
TINY_MODEL = [
    "model.vocab_size=512",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "model.max_seq_len=64",
]
TINY_PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Four real plays from the embedded corpus, as .txt files."""
    from megalite.data.prepare import shakespeare_dir

    root = tmp_path_factory.mktemp("corpus")
    for name in TINY_PLAYS:
        shutil.copy(shakespeare_dir() / name, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus, tmp_path_factory) -> Path:
    """A prepared dataset: 512-token BPE, samples of 32 + 1 tokens, one play held out."""
    from megalite.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(
        PrepareOptions(
            inputs=[str(tiny_corpus)], out=str(out), seq_len=32, vocab_size=512, val_fraction=0.25
        )
    )
    return out


def data_overrides(data_dir: Path, seq_len: int = 32) -> list[str]:
    return [f"data.dir={data_dir}", f"data.seq_len={seq_len}"]


def compose(overrides: list[str]):
    """The typed Config that `megalite-train <overrides>` would build."""
    from megalite.compose import compose_config

    return compose_config(overrides)


def tiny_train_overrides(data_dir: Path, run_dir: Path, **train) -> list[str]:
    base = {
        "max_steps": 8,
        "micro_batch_size": 4,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "ckpt_every": 4,
        "precision": "fp32",
        "plot": False,
        "run_dir": str(run_dir),
    }
    base.update(train)
    return [
        *TINY_MODEL,
        *data_overrides(data_dir),
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        *[f"train.{k}={v}" for k, v in base.items()],
    ]


def run_torchrun(nproc: int, args: list[str], *, env: dict | None = None, timeout: int = 600):
    """`torchrun --standalone --nproc_per_node=<nproc> <args>`: real gloo ranks on this machine,
    one CPU thread each (two ranks share two cores), with the repo importable by the script."""
    return run_cli(
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args],
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})},
        timeout=timeout,
    )


def run_cli(args: list[str], *, env: dict | None = None, timeout: int = 600, cwd=None):
    """Runs a console script or `python -m ...` and returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or REPO
    )
