"""`megalite-generate`: sample text from a checkpoint with a KV cache.

megalite-generate runs/cpu_demo --prompt "ROMEO:" --max-new-tokens 100          # greedy
megalite-generate runs/cpu_demo --prompt "ROMEO:" --prompt "JULIET:" \\
    --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1 --json out.json

Decoding: the prompts are left-padded to a common length and run through the model once
(prefill), then one token per step reuses the cached keys and values. Each sequence's tokens
sit at positions 0, 1, 2, ... whatever its padding (the cache masks the padding), so a prompt
decodes the same alone as in a batch. A sequence stops at an end-of-sequence token (not
returned) or after --max-new-tokens. Sampling draws from one seeded generator: the same
prompts, settings and seed give the same tokens.

Shape legend: B batch, T sequence, V vocab.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megalite import cli_args
from megalite.checkpoint import load_for_inference, resolve_checkpoint
from megalite.config import ConfigError
from megalite.data.common import DataError
from megalite.errors import MegaliteError, cli_error
from megalite.evaluate import (
    autocast_for,
    eos_ids,
    find_tokenizer,
    load_tokenizer,
    resolve_device,
    run_data_config,
)
from megalite.model.layers import KVCache
from megalite.model.transformer import Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    # 0: greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 1.0
    # Keep only the k most likely tokens (None: all).
    top_k: int | None = None
    # Keep the smallest set of most likely tokens whose probability reaches top_p (None: all).
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p={self.top_p} must be in (0, 1]")


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "eos", "stop" (the `stop` predicate said so) or "length"


def filter_logits(
    logits_BV: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits with every token outside the top-k / top-p (nucleus) set at -inf."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the first always stays.
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
        drop_BV = drop_BV.scatter(-1, order_BV, drop_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: torch.Tensor, s: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """One token per row (B,). Draws once per row from `generator` unless greedy."""
    if s.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = filter_logits(logits_BV.float() / s.temperature, s.top_k, s.top_p)
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    s: SamplingConfig,
    eos: Sequence[int] = (),
    *,
    use_cache: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[Completion]:
    """Continues each prompt (token ids). A row ends at an EOS token, or once `stop(tokens)`
    (called on its generated tokens after each new one) is true; the batch stops when every row
    has ended. `use_cache=False` recomputes the whole prefix of each sequence at every step with
    the plain forward: slow, the reference the cache is tested against."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (an empty prompt: pass EOS)")
    cfg = model.cfg
    lens = [len(p) for p in prompts]
    total = max(lens) + s.max_new_tokens
    if total > cfg.max_seq_len:
        raise ConfigError(
            f"the longest prompt ({max(lens)} tokens) + --max-new-tokens={s.max_new_tokens} = "
            f"{total} exceeds model.max_seq_len={cfg.max_seq_len}; shorten one of them"
        )
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(s.seed)
    b = len(prompts)
    seqs = [list(p) for p in prompts]
    if use_cache:
        pad_B = torch.tensor([max(lens) - n for n in lens])
        # Padding slots hold token 0: the cache mask keeps every real token from seeing them.
        x_BT = torch.zeros(b, max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            x_BT[i, pad_B[i] :] = torch.tensor(p)
        cache = KVCache(
            cfg.n_layers, b, total, cfg.kv_heads, cfg.head_dim, pad_B=pad_B,
            dtype=model.tok_embeddings.weight.dtype, device=device,
        )  # fmt: skip
        logits_BV = model(x_BT.to(device), cache=cache)[:, -1]
    else:
        logits_BV = _last_logits(model, seqs, device)
    out: list[list[int]] = [[] for _ in prompts]
    finish = [""] * b
    for step in range(s.max_new_tokens):
        next_B = sample_next(logits_BV, s, generator)
        for i, tok in enumerate(next_B.tolist()):
            seqs[i].append(tok)
            if finish[i]:
                continue
            if tok in eos:
                finish[i] = "eos"
            else:
                out[i].append(tok)
                if stop is not None and stop(out[i]):
                    finish[i] = "stop"
        if all(finish) or step == s.max_new_tokens - 1:
            break
        # Finished rows keep decoding (their tokens are ignored): the batch shape stays fixed
        # and every row draws from the generator at every step, as alone.
        if use_cache:
            logits_BV = model(next_B[:, None], cache=cache)[:, -1]
        else:
            logits_BV = _last_logits(model, seqs, device)
    return [Completion(toks, f or "length") for toks, f in zip(out, finish)]


def _last_logits(model: Transformer, seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """Next-token logits of each sequence from a full forward over it alone (no cache)."""
    rows = [model(torch.tensor([seq], device=device))[0, -1] for seq in seqs]
    return torch.stack(rows)


# --------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    args = cli_args.generate().parse_args(argv)
    try:
        texts = list(args.prompt)
        if args.prompts_file:
            path = Path(args.prompts_file)
            if not path.is_file():
                raise DataError(f"--prompts-file={str(path)!r} does not exist")
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        if not texts:
            raise ConfigError("no prompt; pass --prompt TEXT (repeatable) or --prompts-file FILE")
        s = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        ckpt = resolve_checkpoint(args.checkpoint)
        device = resolve_device(args.device)
        run = run_data_config(ckpt)
        tok = load_tokenizer(find_tokenizer(ckpt, args.tokenizer, run))
        model, meta = load_for_inference(ckpt, device)
        eos = eos_ids(meta, tok, run)
        # An empty prompt starts a new document, as EOS does in the training stream.
        prompts = [tok.encode(t).ids or eos[:1] for t in texts]
        with autocast_for(args.precision, device):
            done = generate(model, prompts, s, eos, use_cache=not args.no_cache)
    except MegaliteError as e:
        return cli_error("megalite-generate", e)
    results = []
    for text, c in zip(texts, done):
        completion = tok.decode(c.tokens)
        print(f"--- {text!r} ({len(c.tokens)} tokens, {c.finish_reason})\n{text}{completion}")
        results.append({"prompt": text, "completion": completion, **asdict(c)})
    if args.json:
        record = {"checkpoint": str(ckpt), "step": meta.get("step"), "sampling": asdict(s)}
        Path(args.json).write_text(json.dumps({**record, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
