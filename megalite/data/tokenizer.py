"""Tokenizers: train a byte-level BPE, or load a `tokenizer.json` or a tiktoken encoding file.

Every tokenizer ends up as an HF `tokenizers.Tokenizer` saved as `tokenizer.json` next to the
shards, so everything downstream reads one format and the dataset's tokenizer hash is the hash of
that file.

A tiktoken encoding file (`cl100k_base.tiktoken` and the like) holds one `<base64 token> <rank>`
per line. It is converted exactly: the vocabulary is the ranked byte strings (in GPT-2's
byte-to-unicode alphabet), the merges are recovered by running BPE on each token with the ranks
below its own, ordered by rank, and whole pre-tokens found in the vocabulary are emitted directly
(`ignore_merges`), which is what tiktoken does. The pre-tokenization regex is not in the file:
`--tiktoken-pattern` gives it (the default is cl100k's, written without possessive quantifiers).
Special tokens get the ids after the largest rank.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from megalite.data.common import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# cl100k_base's split pattern (also Llama 3's), in a form both tiktoken and Oniguruma accept.
DEFAULT_TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], length: int | None = None
) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained with HF `tokenizers`, offline.
    Special tokens take the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise DataError(
            f"--vocab-size={vocab_size} is smaller than the 256 byte tokens plus "
            f"{len(special_tokens)} special tokens; use at least 512"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(
    path: str | Path, special_tokens: list[str], pattern: str | None = None
) -> tuple[Tokenizer, str]:
    """The tokenizer in `path` and its kind (`tokenizer.json` or `tiktoken`). A `.json` file is
    read as HF tokenizers JSON and must already hold every special token; any other file is read
    as a tiktoken encoding file and the special tokens are appended."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--tokenizer {str(path)!r} does not exist")
    if path.suffix == ".json":
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(
                f"tokenizer file {str(path)!r} is not a valid HF tokenizers JSON file ({e})"
            ) from e
        missing = [t for t in special_tokens if tok.token_to_id(t) is None]
        if missing:
            raise DataError(
                f"tokenizer file {str(path)!r} has no token {missing[0]!r}; add it to the "
                "tokenizer, or name the tokenizer's own end-of-text token with --eos-token"
            )
        return tok, "tokenizer.json"
    ranks = read_tiktoken(path)
    return tiktoken_to_tokenizer(ranks, pattern or DEFAULT_TIKTOKEN_PATTERN, special_tokens), (
        "tiktoken"
    )


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """Parses a tiktoken encoding file: one `<base64 token> <rank>` per line."""
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise DataError(
                    f"{path}:{lineno} is not a '<base64 token> <rank>' line ({e}); --tokenizer "
                    "takes a tokenizer.json or a tiktoken encoding file"
                ) from e
            if token in ranks or rank in seen_ranks:
                raise DataError(f"{path}:{lineno} repeats a token or rank ({rank})")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise DataError(f"tiktoken file {str(path)!r} is empty")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"tiktoken file {str(path)!r} has no rank for byte 0x{missing[0]:02x} ({len(missing)}"
            " of 256 bytes missing); a byte-level BPE needs every single byte"
        )
    return ranks


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (HF ByteLevel)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges ranked below max_rank (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def tiktoken_to_tokenizer(
    ranks: dict[bytes, int], pattern: str, special_tokens: list[str]
) -> Tokenizer:
    """An HF tokenizer that encodes exactly like tiktoken with these ranks and pattern."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        # A token not reachable by merges can still be matched as a whole pre-token.
        if len(parts) == 2:
            merges.append((spell(parts[0]), spell(parts[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    try:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    except Exception as e:
        raise DataError(f"--tiktoken-pattern {pattern!r} is not a valid regex ({e})") from e
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    next_id = max(ranks.values()) + 1
    for i, special in enumerate(special_tokens):
        added = tok.add_special_tokens([AddedToken(special, special=True, normalized=False)])
        assert added == 1 and tok.token_to_id(special) == next_id + i, special
    return tok


def vocab_size(tok: Tokenizer) -> int:
    """Largest token id + 1 (what the model's embedding must hold)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1
