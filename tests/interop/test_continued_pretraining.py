"""Continued pretraining from an imported Llama: `train.init_from=<converted dir>` with the
model preset megalite-convert writes starts from exactly the imported model."""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megalite.interop.llama_hf import import_hf
from megalite.metrics import read_metrics
from tests.conftest import compose, tiny_train_overrides
from tests.interop.helpers import random_hf_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


def test_training_from_an_imported_llama_starts_at_its_loss(tiny_data, tmp_path):
    """The trainer's first loss (computed before any update) equals transformers' loss of the
    source model on the same batch, so every weight and the RoPE/norm settings arrived. The
    source model's loss is far from a fresh init's (ln 512), so a run that ignored init_from
    would fail."""
    from megalite.data.loader import TrainStream
    from megalite.trainer import Trainer

    hf = random_hf_llama(
        tied=True, vocab_size=512, hidden_size=64, num_attention_heads=4, intermediate_size=96
    )
    hf.save_pretrained(tmp_path / "hf")
    conv = import_hf(tmp_path / "hf", tmp_path / "imported", name="imported").out
    base = tiny_train_overrides(tiny_data, tmp_path / "run", max_steps=2, eval_every=0)
    cfg = compose(
        [
            f"hydra.searchpath=[file://{conv}/conf]",
            "model=imported",
            f"train.init_from={conv}",
            *[o for o in base if not o.startswith("model.")],  # the preset gives the model
        ]
    )
    assert (cfg.model.rope_theta, cfg.model.norm_eps, cfg.model.ffn_dim) == (5e5, 1e-5, 96)
    Trainer(cfg).fit()
    gc.collect()
    first = next(r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)

    stream = TrainStream(cfg.data, cfg.train.micro_batch_size, seed=cfg.train.seed)
    try:
        x, y = next(stream)
    finally:
        stream.close()
    with torch.no_grad():
        ref = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert first == pytest.approx(ref, rel=1e-5)
    # A fresh init (std 0.02) scores ln(512) +- 0.01 here.
    assert abs(ref - math.log(512)) > 0.1
