"""Bits per byte: the loss measured per byte of text instead of per token, so runs with different
tokenizers compare (a tokenizer with longer tokens has a higher loss per token for the same model
quality; per byte it does not).

    bpb = (sum of token losses in nats) / (ln 2 * UTF-8 bytes those tokens spell)
        = loss_per_token * tokens / (ln 2 * bytes)

The bytes a token spells come from a table built once per tokenizer (`token_bytes`): for a
byte-level BPE (every megalite tokenizer, GPT-2 / Llama 3 style ones) the exact byte count of
each token; special tokens (EOS, padding) spell no text and count 0 bytes. For other tokenizers
(SentencePiece) the length of each token's decoded text, which can be off by the odd space.
lm-evaluation-harness's rolling-loglikelihood tasks report the same quantity (`bits_per_byte`)
from the document's own bytes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megalite.data.tokenizer import bytes_to_unicode

if TYPE_CHECKING:
    from tokenizers import Tokenizer

LN2 = math.log(2.0)


def token_bytes(tok: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(V,) int64: the UTF-8 bytes each token id spells (0 for special and unused ids)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab_size or 0, max(vocab.values()) + 1)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    alphabet = {c: b for b, c in bytes_to_unicode().items()}
    byte_level = type(tok.decoder).__name__ == "ByteLevel"
    table = torch.zeros(size, dtype=torch.long)
    for piece, i in vocab.items():
        if i in special:
            continue
        if byte_level and all(c in alphabet for c in piece):
            table[i] = len(piece)  # one alphabet character per byte
        else:
            table[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return table


@lru_cache(maxsize=4)
def token_bytes_of_file(path: str, vocab_size: int | None = None) -> torch.Tensor:
    from tokenizers import Tokenizer

    return token_bytes(Tokenizer.from_file(path), vocab_size)


def bits_per_byte(loss_nats_per_token: float, tokens: int | float, nbytes: int | float) -> float:
    """Bits per byte from a mean per-token loss over `tokens` tokens spelling `nbytes` bytes
    (nan when there are no bytes)."""
    if not nbytes:
        return float("nan")
    return loss_nats_per_token * tokens / (LN2 * nbytes)


def data_token_bytes(data_dir: str | None, vocab_size: int) -> torch.Tensor | None:
    """The byte table of a prepared dataset's tokenizer.json, or None when it has none (then no
    bits per byte is reported)."""
    if not data_dir:
        return None
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    return token_bytes_of_file(str(path), vocab_size)
