"""Fused linear + cross-entropy vs naive logits: peak memory (and time on CUDA).

CUDA: megalite's Triton path vs ``F.cross_entropy(hidden @ weight.T)``, forward + backward, bf16.
CPU: the same chunked algorithm written in pure PyTorch vs naive logits at vocab 128K, each
measured in a fresh process (peak RSS above the inputs); prints and saves the memory ratio.

    python benchmarks/bench_fused_linear_cross_entropy.py [--runs 3] [--tokens 512] [--hidden 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from megalite.kernels import _bench
from megalite.kernels.fused_linear_cross_entropy import chunk_rows

VOCAB = 128256  # Llama 3's vocabulary
IGNORE = -100


def chunked_linear_cross_entropy_torch(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, grad hidden, grad weight): the Triton path's algorithm in pure PyTorch, with
    the same chunk size; the per-chunk softmax gradient is built in place in the logits chunk."""
    n_rows, n_hidden = hidden.shape
    valid = target != IGNORE
    inv_n_valid = 1.0 / valid.sum()
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32)
    loss = torch.zeros((), dtype=torch.float32)
    rows = chunk_rows(n_rows, weight.shape[0], n_hidden, hidden.element_size())
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h, t, ok = hidden[start:end], target[start:end], valid[start:end]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        safe_t = t.clamp(min=0)
        loss += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * ok).sum()
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
        grad[torch.arange(end - start), safe_t] -= 1.0
        grad.mul_((ok * inv_n_valid)[:, None])
        grad_hidden[start:end] = (grad.to(hidden.dtype) @ weight).to(hidden.dtype)
        grad_weight.addmm_(grad.t(), h.float())  # in place: no V x C temporary
    return loss * inv_n_valid, grad_hidden, grad_weight.to(weight.dtype)


def naive_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).float(), target, ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), h.grad, w.grad


PATHS = {"naive": naive_linear_cross_entropy, "chunked_torch": chunked_linear_cross_entropy_torch}


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    target[::9] = IGNORE
    return h, w, target


def child(path: str, tokens: int, hidden: int) -> None:
    """One measurement in this fresh process: peak RSS growth over the inputs during ``path``."""
    torch.set_num_threads(2)
    h, w, target = _inputs(tokens, hidden, VOCAB, torch.float32)
    gc.collect()
    base = _bench.current_rss_bytes()
    start = time.perf_counter()
    PATHS[path](h, w, target)
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_bytes": _bench.peak_rss_bytes() - base, "seconds": seconds}))


def check_paths_agree() -> None:
    """Both CPU paths compute the same loss and gradients (small shape, several chunks)."""
    h, w, target = _inputs(67, 48, 1000, torch.float32)
    for a, b in zip(
        naive_linear_cross_entropy(h, w, target), chunked_linear_cross_entropy_torch(h, w, target)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    check_paths_agree()
    measured = {}
    for path in PATHS:
        runs = [
            _bench.run_in_fresh_process(
                __file__,
                ["--child", path, "--tokens", str(args.tokens), "--hidden", str(args.hidden)],
            )
            for _ in range(args.runs)
        ]
        measured[path] = (
            statistics.median(r["extra_bytes"] for r in runs) / 2**20,
            statistics.median(r["seconds"] for r in runs),
        )
    ratio = measured["chunked_torch"][0] / measured["naive"][0]
    logits_mib = args.tokens * VOCAB * 4 / 2**20
    # Both paths must produce grad_hidden and grad_weight; what is left is each path's overhead.
    grads_mib = (args.tokens + VOCAB) * args.hidden * 4 / 2**20
    overhead = {p: mib - grads_mib for p, (mib, _) in measured.items()}
    meta = _bench.provenance()
    rows = [
        {
            **meta,
            "impl": path,
            "tokens": args.tokens,
            "hidden": args.hidden,
            "vocab": VOCAB,
            "dtype": "float32",
            "runs": args.runs,
            "peak_extra_mib_median": mib,
            "seconds_median": sec,
            "fp32_logits_mib": logits_mib,
            "grads_mib": grads_mib,
            "overhead_mib": overhead[path],
            "mem_ratio_vs_naive": mib / measured["naive"][0],
            "overhead_ratio_vs_naive": overhead[path] / overhead["naive"],
        }
        for path, (mib, sec) in measured.items()
    ]
    _bench.write_rows("fused_linear_cross_entropy_cpu", rows)
    print(
        f"chunked / naive peak memory = {ratio:.3f}; without the gradients both must hold "
        f"({grads_mib:.0f} MiB): {overhead['chunked_torch'] / overhead['naive']:.3f} "
        f"(the full fp32 logits alone are {logits_mib:.0f} MiB)"
    )
    return rows


def bench_cuda(args: argparse.Namespace) -> list[dict]:
    from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    dtype = torch.bfloat16
    tokens, hidden = args.tokens, args.hidden
    h, w, target = _inputs(tokens, hidden, VOCAB, dtype, "cuda")

    def run(fn):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        fn(hh, ww, target).backward()

    def naive(hh, ww, t):
        return F.cross_entropy((hh @ ww.t()).float(), t, ignore_index=IGNORE)

    impls = {"torch_naive": naive, "megalite_triton": fused_linear_cross_entropy}
    meta = _bench.provenance()
    rows = []
    for name, fn in impls.items():
        ms, mib = _bench.cuda_time_and_memory(lambda fn=fn: run(fn), runs=args.runs)
        rows.append(
            {
                **meta,
                "impl": name,
                "tokens": tokens,
                "hidden": hidden,
                "vocab": VOCAB,
                "dtype": str(dtype),
                "runs": args.runs,
                "fwd_bwd_ms_median": ms,
                "peak_extra_mib_median": mib,
            }
        )
    for r in rows:
        r["mem_ratio_vs_naive"] = r["peak_extra_mib_median"] / rows[0]["peak_extra_mib_median"]
        r["speedup_vs_naive"] = rows[0]["fwd_bwd_ms_median"] / r["fwd_bwd_ms_median"]
    _bench.write_rows("fused_linear_cross_entropy_cuda", rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    # CPU defaults keep a run near a minute on two cores; CUDA ones are a realistic micro-batch.
    args.tokens = args.tokens or (8192 if cuda else 512)
    args.hidden = args.hidden or (4096 if cuda else 256)
    if args.child:
        child(args.child, args.tokens, args.hidden)
    elif cuda:
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
