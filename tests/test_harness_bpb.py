"""Bits per byte (megalite/bpb.py) in megalite-eval: the byte table spells exactly the bytes of
the text a byte-level BPE encodes, and bpb = summed loss / (ln 2 x those bytes)."""

from __future__ import annotations

import math

import pytest
import torch

from megalite.bpb import bits_per_byte, token_bytes
from megalite.config import ModelConfig
from megalite.data.common import EOS
from tests.interop.helpers import random_checkpoint

TEXT = "Friends, Romans, countrymen — lend me your ears; naïve café, 日本語.\nThe evil that men do"


def test_byte_table_spells_the_utf8_bytes_and_nothing_for_special_tokens():
    from megalite.data.tokenizer import train_bpe

    tok = train_bpe([TEXT * 3, "lend me your ears"], 300, [EOS])
    table = token_bytes(tok, vocab_size=320)
    assert table.shape == (320,) and int(table[tok.token_to_id(EOS)]) == 0
    ids = tok.encode(TEXT + EOS + TEXT).ids
    assert int(table[ids].sum()) == 2 * len(TEXT.encode("utf-8"))
    assert bits_per_byte(2.0, 10, 0) != bits_per_byte(2.0, 10, 0)  # nan without bytes
    assert bits_per_byte(math.log(2), 8, 8) == pytest.approx(1.0)


def test_megalite_eval_reports_bits_per_byte_for_text_and_val_split(tiny_data, tmp_path, capsys):
    from tokenizers import Tokenizer

    from megalite.config import DataConfig
    from megalite.data.loader import ValSet
    from megalite.evaluate import evaluate, main

    cfg = ModelConfig(
        vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64, init_std=0.2
    )
    ckpt = random_checkpoint(tmp_path / "ckpt", cfg, tokenizer=tiny_data / "tokenizer.json")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    res = evaluate(ckpt, text=text, seq_len=16, device="cpu")
    assert res.bytes == len(TEXT.encode("utf-8"))
    assert res.bpb == pytest.approx(res.loss * res.tokens / (math.log(2) * res.bytes))
    assert main([str(ckpt), "--text", str(text), "--seq-len", "16", "--device", "cpu"]) == 0
    assert f"{res.bpb:.4f} bits/byte" in capsys.readouterr().out
    # A prepared split: the bytes its target tokens spell, which for this (ASCII) corpus is
    # the length of the decoded targets without the EOS separators.
    res = evaluate(ckpt, data_dir=tiny_data, batch_size=4, max_batches=2, device="cpu")
    tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    val = ValSet(DataConfig(dir=str(tiny_data), seq_len=32), rank=0, world_size=1)
    try:
        # megalite-eval reads the split in order: its first 8 samples here.
        first = [y for _, (_, y) in zip(range(8), val.batches(1, len(val)))]
        targets = torch.cat(first).flatten().tolist()
    finally:
        val.close()
    assert res.tokens == len(targets) == 8 * 32
    assert res.bytes == len(tok.decode(targets, skip_special_tokens=True).encode("utf-8"))
    assert res.bpb == pytest.approx(res.loss * res.tokens / (math.log(2) * res.bytes))
