"""Flash attention: megalite's Triton kernels vs PyTorch SDPA and eager attention, fwd + bwd.

CUDA: bf16, causal, GQA (32 query heads, 8 kv heads), head_dim 64 and 128, against
``F.scaled_dot_product_attention(enable_gqa=True)`` (PyTorch's fused kernels) and eager attention
(materialized T x T scores), reporting time and peak memory.
CPU: the kernels run once in the Triton interpreter at a small shape and the row records the error
against the reference (timings need a GPU).

    python benchmarks/bench_flash_attention.py [--runs 5]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megalite.kernels import _bench, reference

SHAPES_CUDA = [(4, 2048, 32, 8, 128), (2, 4096, 32, 8, 128), (4, 2048, 32, 8, 64)]


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def _impls():
    from megalite.kernels.flash_attention import flash_attention

    return {
        "torch_sdpa": _sdpa,
        "torch_eager_fp32": lambda q, k, v: reference.attention(q, k, v, causal=True),
        "megalite_triton": lambda q, k, v: flash_attention(q, k, v, causal=True),
    }


def bench_cuda(runs: int) -> None:
    meta, rows = _bench.provenance(), []
    for batch, seqlen, n_heads, n_kv, head_dim in SHAPES_CUDA:
        q = torch.randn(batch, seqlen, n_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, seqlen, n_kv, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        do = torch.randn_like(q)
        # causal attention FLOPs, forward (2 matmuls) + backward (5 matmuls), half the T x T
        flops = 7 * 2 * batch * n_heads * seqlen * seqlen * head_dim / 2
        for name, fn in _impls().items():

            def step(fn=fn, q=q, k=k, v=v, do=do):
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                fn(qq, kk, vv).backward(do)

            ms, mib = _bench.cuda_time_and_memory(step, runs)
            rows.append(
                {
                    **meta,
                    "impl": name,
                    "batch": batch,
                    "seqlen": seqlen,
                    "heads": n_heads,
                    "kv_heads": n_kv,
                    "head_dim": head_dim,
                    "dtype": "bf16",
                    "runs": runs,
                    "fwd_bwd_ms_median": ms,
                    "tflops": flops / ms / 1e9,
                    "peak_extra_mib_median": mib,
                }
            )
    _bench.write_rows("flash_attention_cuda", rows)


def check_cpu() -> None:
    q = torch.randn(1, 45, 4, 64, dtype=torch.float16)
    k = torch.randn(1, 45, 2, 64, dtype=torch.float16)
    v = torch.randn(1, 45, 2, 64, dtype=torch.float16)
    out = _impls()["megalite_triton"](q, k, v)
    err = (out.float() - reference.attention(q.float(), k.float(), v.float())).abs().max()
    _bench.write_rows(
        "flash_attention_cpu",
        [
            {
                **_bench.provenance(),
                "impl": "megalite_triton (interpreter)",
                "shape": "1x45x4(2)x64",
                "dtype": "fp16",
                "max_abs_err_vs_fp32_ref": err.item(),
                "timing": "needs CUDA",
            }
        ],
    )


def main() -> None:
    _bench.cli(__doc__.splitlines()[0], bench_cuda, check_cpu)


if __name__ == "__main__":
    main()
