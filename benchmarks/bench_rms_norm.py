"""RMSNorm: megalite's Triton kernel vs PyTorch, forward + backward time and peak memory.

CUDA: bf16 activations at LLM widths against eager ``F.rms_norm`` and megalite's fp32 reference.
CPU: no GPU timing is possible; the kernel runs once in the Triton interpreter at a small shape
and the row records its error against the reference (a check that the script itself works).

    python benchmarks/bench_rms_norm.py [--runs 5]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megalite.kernels import _bench, reference

SHAPES_CUDA = [(16384, 2048), (16384, 4096), (8192, 8192)]


def _impls():
    from megalite.kernels.rms_norm import rms_norm

    return {
        "torch_F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
        "megalite_reference": reference.rms_norm,
        "megalite_triton": rms_norm,
    }


def bench_cuda(runs: int) -> None:
    meta, rows = _bench.provenance(), []
    for n_rows, hidden in SHAPES_CUDA:
        x = torch.randn(n_rows, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        for name, fn in _impls().items():

            def step(fn=fn, x=x, w=w, dy=dy):
                xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
                fn(xx, ww).backward(dy)

            ms, mib = _bench.cuda_time_and_memory(step, runs)
            rows.append(
                {
                    **meta,
                    "impl": name,
                    "rows": n_rows,
                    "hidden": hidden,
                    "dtype": "bf16",
                    "runs": runs,
                    "fwd_bwd_ms_median": ms,
                    "peak_extra_mib_median": mib,
                }
            )
    _bench.write_rows("rms_norm_cuda", rows)


def check_cpu() -> None:
    x = torch.randn(37, 300, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(300, dtype=torch.bfloat16, requires_grad=True)
    out = _impls()["megalite_triton"](x, w)
    err = (out.float() - reference.rms_norm(x.detach().float(), w.detach().float())).abs().max()
    _bench.write_rows(
        "rms_norm_cpu",
        [
            {
                **_bench.provenance(),
                "impl": "megalite_triton (interpreter)",
                "rows": 37,
                "hidden": 300,
                "dtype": "bf16",
                "max_abs_err_vs_fp32_ref": err.item(),
                "timing": "needs CUDA",
            }
        ],
    )


def main() -> None:
    _bench.cli(__doc__.splitlines()[0], bench_cuda, check_cpu)


if __name__ == "__main__":
    main()
