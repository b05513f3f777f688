"""Where megalite's per-step time against nanoGPT comes from: nanoGPT's GPT against megalite's
Transformer at the same shape, and megalite variants that swap one Llama part for nanoGPT's, all
in one process, interleaved round by round.

    .venv/bin/python benchmarks/bench_vs_nanogpt.py --nanogpt DIR [--rounds 6] [--steps 10]

DIR holds nanoGPT's model.py (a checkout of karpathy/nanoGPT; megalite does not ship it).
`../shared/bench/vs-nanogpt` compares the two *training programs* (nanoGPT's train.py and
megalite-train: loop, data loader and model together). This compares the *models* with one bare
loop, so the loop drops out: each step is forward, backward, clip_grad_norm_(1.0), torch AdamW
step, zero_grad, loss.item(), on a fixed in-memory batch.

The shape is vs-nanogpt's: 4 layers, 4 heads, dim 128, sequence 64, batch 12, fp32, one CPU
thread, and vocab 512 for every model (vs-nanogpt gives nanoGPT its 65-character vocab, so its
output layer is 8x smaller there). Models:

- nanogpt: GPT-2 blocks (LayerNorm, GELU MLP 4x, learned positions, tied output), no bias.
- megalite: Llama blocks (RMSNorm, SwiGLU with ffn 344 ~ the same FLOPs, RoPE, untied output).
- megalite_layernorm: megalite with torch's fused LayerNorm in place of its RMSNorm.
- megalite_no_rope: megalite with the RoPE rotation skipped.
- megalite_tied: megalite with `model.tie_embeddings=true`.
- megalite_compiled: megalite with its blocks compiled as `train.compile=true` does
  (`compile_blocks`, inductor; its compile time falls in the warm-up).

Each round times `--steps` steps of every model after its warm-up, in an order that rotates per
round, so load from other work falls on all alike; the ratio is median(model step) /
median(nanogpt step) over every timed step. Rows go to
benchmarks/results/vs_nanogpt-<timestamp>.csv with the git SHA, device and timestamp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from megalite.kernels import _bench

from megalite.config import ModelConfig
from megalite.model import layers
from megalite.model.transformer import build_model
from megalite.parallel.parallelize import compile_blocks

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
B, T, VOCAB = 12, 64, 512
SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=344, max_seq_len=T)


def nanogpt_model(directory: Path) -> torch.nn.Module:
    if not (directory / "model.py").is_file():
        sys.exit(f"--nanogpt {directory}: no model.py there; give a karpathy/nanoGPT checkout")
    sys.path.insert(0, str(directory))
    from model import GPT, GPTConfig  # nanoGPT's module

    cfg = GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128)
    cfg.dropout, cfg.bias = 0.0, False
    return GPT(cfg)


def megalite_model(**extra) -> torch.nn.Module:
    return build_model(ModelConfig(vocab_size=VOCAB, **SHAPE, **extra))


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    compile_blocks(model)
    return model


def layer_norm_instead(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, layers.RMSNorm):
            m._fn = lambda x, w, eps: F.layer_norm(x, (x.shape[-1],), w, None, eps)
    return model


class Runner:
    """One model's bare training step, with a context it runs under (a patch, or none)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_of: Callable,
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (B, T), generator=gen)
        self.y = torch.randint(0, VOCAB, (B, T), generator=gen)
        self.model, self.loss_of, self.context = model, loss_of, context
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.n_params = sum(p.numel() for p in model.parameters())

    def step(self) -> float:
        loss = self.loss_of(self.model, self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def time(self, n: int) -> list[float]:
        with self.context():
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                self.step()
                out.append(time.perf_counter() - t0)
            return out


def runners(nanogpt_dir: Path) -> dict[str, Runner]:
    def megalite_loss(m, x, y):
        return m(x, y)

    def no_rope():
        return mock.patch.object(layers, "_rotate", lambda x, cos, sin: x)

    return {
        "nanogpt": Runner(nanogpt_model(nanogpt_dir), lambda m, x, y: m(x, y)[1]),
        "megalite": Runner(megalite_model(), megalite_loss),
        "megalite_layernorm": Runner(layer_norm_instead(megalite_model()), megalite_loss),
        "megalite_no_rope": Runner(megalite_model(), megalite_loss, no_rope),
        "megalite_tied": Runner(megalite_model(tie_embeddings=True), megalite_loss),
        "megalite_compiled": Runner(compiled(megalite_model()), megalite_loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a dir holding nanoGPT's model.py")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and model")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    run = runners(args.nanogpt)
    for r in run.values():
        r.time(args.warmup)
    times: dict[str, list[float]] = {name: [] for name in run}
    names = list(run)
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name] += run[name].time(args.steps)
    base = statistics.median(times["nanogpt"])
    common = _bench.provenance()
    rows = []
    for name in names:
        ms = statistics.median(times[name])
        rows.append(
            {
                **common,
                "model": name,
                "n_params": run[name].n_params,
                "median_ms": 1e3 * ms,
                "ratio_to_nanogpt": ms / base,
                "steps": len(times[name]),
            }
        )
        print(
            f"{name:20s} {run[name].n_params / 1e6:6.3f}M params {1e3 * ms:7.2f} ms/step  "
            f"x{ms / base:.3f} of nanoGPT"
        )
    _bench.write_csv(OUT / f"vs_nanogpt-{time.strftime('%Y%m%d-%H%M%S')}.csv", rows)


if __name__ == "__main__":
    main()
