"""Cross-entropy: megalite's Triton kernel vs PyTorch, forward + backward time and peak memory.

CUDA: bf16 logits at vocab 32K and 128K against ``F.cross_entropy(logits.float())`` (what a model
computing its loss in fp32 runs) and ``F.cross_entropy(logits)``.
CPU: the kernel runs once in the Triton interpreter at a small shape and the row records its
error against the reference (timings need a GPU).

    python benchmarks/bench_cross_entropy.py [--runs 5]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megalite.kernels import _bench, reference

SHAPES_CUDA = [(8192, 32000), (8192, 128256)]


def _impls():
    from megalite.kernels.cross_entropy import cross_entropy

    return {
        "torch_fp32_upcast": lambda x, t: F.cross_entropy(x.float(), t),
        "torch_bf16": F.cross_entropy,
        "megalite_triton": cross_entropy,
    }


def bench_cuda(runs: int) -> None:
    meta, rows = _bench.provenance(), []
    for n_rows, vocab in SHAPES_CUDA:
        logits = torch.randn(n_rows, vocab, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, vocab, (n_rows,), device="cuda")
        for name, fn in _impls().items():

            def step(fn=fn, logits=logits, target=target):
                fn(logits.detach().requires_grad_(), target).backward()

            ms, mib = _bench.cuda_time_and_memory(step, runs)
            rows.append(
                {
                    **meta,
                    "impl": name,
                    "rows": n_rows,
                    "vocab": vocab,
                    "dtype": "bf16",
                    "runs": runs,
                    "fwd_bwd_ms_median": ms,
                    "peak_extra_mib_median": mib,
                }
            )
    _bench.write_rows("cross_entropy_cuda", rows)


def check_cpu() -> None:
    logits = 3 * torch.randn(37, 1000)
    target = torch.randint(0, 1000, (37,))
    out = _impls()["megalite_triton"](logits, target)
    err = (out - reference.cross_entropy(logits, target)).abs().item()
    _bench.write_rows(
        "cross_entropy_cpu",
        [
            {
                **_bench.provenance(),
                "impl": "megalite_triton (interpreter)",
                "rows": 37,
                "vocab": 1000,
                "dtype": "fp32",
                "abs_err_vs_ref": err,
                "timing": "needs CUDA",
            }
        ],
    )


def main() -> None:
    _bench.cli(__doc__.splitlines()[0], bench_cuda, check_cpu)


if __name__ == "__main__":
    main()
