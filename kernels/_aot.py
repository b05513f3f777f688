"""Ahead-of-time GPU builds of every kernel and autotune config, without a GPU.

``python -m megalite.kernels._aot --arch 80 90 --json out.json`` compiles each kernel variant with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and records shared memory
(from Triton's metadata), and registers, stack and local memory (spills) from ``cuobjdump
--dump-resource-usage`` on the cubin (the binary ships inside Triton's wheel).

Must run in a process where TRITON_INTERPRET is unset when the kernel modules are imported: under
the interpreter ``triton.jit`` returns an ``InterpretedFunction``, which cannot be compiled.
``tests/kernels/test_aot_compile.py`` therefore runs this module in a subprocess.

The variants mirror what the launchers use: the autotune lists of the attention kernels, and the
launch-parameter tables (block size, warps) of the row kernels at representative widths, in bf16,
with 16-byte divisibility on pointers and strides as the JIT specializes real training shapes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from megalite.kernels import cross_entropy, rms_norm
from megalite.kernels import flash_attention_bwd as fa_bwd
from megalite.kernels import flash_attention_fwd as fa_fwd
from megalite.kernels._utils import INTERPRET
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Largest dynamic shared memory one block may opt into: 163 KiB on A100 (sm_80), 227 KiB on H100
# (sm_90); 1 KiB below the per-SM capacity (164 / 228 KiB), which the driver reserves.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    name: str  # kernel name
    config: str  # human-readable constexprs and launch options
    fn: Any  # the JITFunction
    types: dict[str, str]  # runtime args -> triton type
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    tags: list[str] = field(default_factory=list)


def _ast_source(v: Variant) -> ASTSource:
    arg_names = v.fn.arg_names
    missing = set(arg_names) - set(v.types) - set(v.constexprs)
    if missing:
        raise ValueError(f"{v.name}: no type or constexpr for {sorted(missing)}")
    signature = {a: ("constexpr" if a in v.constexprs else v.types[a]) for a in arg_names}
    # Pointers and strides are 16-byte aligned / multiples of 16 for real model shapes; the JIT
    # would specialize on that, so the AOT build does too.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(arg_names)
        if a not in v.constexprs and (v.types[a].startswith("*") or a.startswith("stride"))
    }
    return ASTSource(fn=v.fn, signature=signature, constexprs=v.constexprs, attrs=attrs)


def _rms_variants() -> list[Variant]:
    out = []
    ptr = "*bf16"
    for hidden in (2048, 4096, 8192, 16384):
        block, warps = rms_norm.launch_params(hidden)
        cfg = f"C={hidden} BLOCK_C={block} warps={warps}"
        fwd_types = dict(X=ptr, W=ptr, Y=ptr, RSTD="*fp32", stride_x="i32", stride_y="i32")
        fwd_types.update(n_cols="i32", eps="fp32")
        out.append(
            Variant(
                "rms_norm_fwd",
                cfg,
                rms_norm._rms_norm_fwd_kernel,
                fwd_types,
                {"BLOCK_C": block},
                warps,
            )
        )
        bwd_types = dict(DY=ptr, X=ptr, W=ptr, RSTD="*fp32", DX=ptr, DW_PARTIAL="*fp32")
        bwd_types.update(stride_dy="i32", stride_x="i32", stride_dx="i32")
        bwd_types.update(n_rows="i32", n_cols="i32", rows_per_program="i32")
        out.append(
            Variant(
                "rms_norm_bwd",
                cfg,
                rms_norm._rms_norm_bwd_kernel,
                bwd_types,
                {"BLOCK_C": block},
                warps,
            )
        )
    return out


def _ce_variants() -> list[Variant]:
    out = []
    ptr = "*bf16"
    for vocab in (2048, 8192, 128256):
        block, warps = cross_entropy.launch_params(vocab)
        cfg = f"V={vocab} BLOCK_V={block} warps={warps}"
        fwd_types = dict(LOGITS=ptr, TARGET="*i64", LOSS="*fp32", LSE="*fp32", SCALE="*fp32")
        fwd_types.update(stride_logits="i32", stride_scale="i32", n_cols="i32", ignore_index="i32")
        for write_grad in (False, True):
            name = "cross_entropy_fwd" + ("+grad (fused linear CE)" if write_grad else "")
            out.append(
                Variant(
                    name,
                    cfg,
                    cross_entropy._ce_fwd_kernel,
                    fwd_types,
                    {"BLOCK_V": block, "WRITE_GRAD": write_grad},
                    warps,
                )
            )
        bwd_types = dict(LOGITS=ptr, DLOGITS=ptr, TARGET="*i64", LSE="*fp32", SCALE="*fp32")
        bwd_types.update(stride_logits="i32", stride_dlogits="i32", stride_scale="i32")
        bwd_types.update(n_cols="i32", ignore_index="i32")
        out.append(
            Variant(
                "cross_entropy_bwd",
                cfg,
                cross_entropy._ce_bwd_kernel,
                bwd_types,
                {"BLOCK_V": block},
                warps,
            )
        )
    return out


def _strides(*prefixes: str) -> dict[str, str]:
    return {f"stride_{p}{d}": "i32" for p in prefixes for d in ("b", "t", "h")}


def _attention_variants() -> list[Variant]:
    ptr = "*bf16"
    out = []
    for head_dim in fa_fwd.SUPPORTED_HEAD_DIMS:
        fwd_types = dict(Q=ptr, K=ptr, V=ptr, Out=ptr, LSE="*fp32", **_strides("q", "k", "v", "o"))
        fwd_types.update(n_heads="i32", n_rep="i32", seqlen="i32", qk_scale="fp32")
        for i, cfg in enumerate(fa_fwd.FWD_CONFIGS[head_dim]):
            for causal in (True, False) if i == 0 else (True,):
                consts = dict(HEAD_DIM=head_dim, CAUSAL=causal, UPCAST=False, DOT_PRECISION="tf32")
                consts.update(cfg.kwargs)
                out.append(
                    Variant(
                        "attn_fwd",
                        _describe(cfg, head_dim, causal),
                        fa_fwd._attn_fwd_kernel.fn,
                        fwd_types,
                        consts,
                        cfg.num_warps,
                        cfg.num_stages,
                        tags=["attn_fwd"],
                    )
                )
        pre_types = dict(Out=ptr, DO=ptr, DELTA="*fp32", **_strides("o", "do"))
        pre_types.update(n_heads="i32", seqlen="i32")
        out.append(
            Variant(
                "attn_bwd_preprocess",
                f"D={head_dim} BLOCK_M={fa_bwd.PREPROCESS_BLOCK_M}",
                fa_bwd._attn_bwd_preprocess_kernel,
                pre_types,
                {"HEAD_DIM": head_dim, "BLOCK_M": fa_bwd.PREPROCESS_BLOCK_M},
                4,
            )
        )
        bwd_common = dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32")
        dkdv_types = dict(bwd_common, DK=ptr, DV=ptr, **_strides("q", "k", "v", "do", "dk"))
        dkdv_types.update(n_heads="i32", n_kv_heads="i32", n_rep="i32", seqlen="i32")
        dkdv_types.update(qk_scale="fp32", sm_scale="fp32")
        dq_types = dict(bwd_common, DQ=ptr, **_strides("q", "k", "v", "do", "dq"))
        dq_types.update(n_heads="i32", n_rep="i32", seqlen="i32", qk_scale="fp32", sm_scale="fp32")
        for kernel, types, configs in (
            (fa_bwd._attn_bwd_dkdv_kernel, dkdv_types, fa_bwd.BWD_DKDV_CONFIGS[head_dim]),
            (fa_bwd._attn_bwd_dq_kernel, dq_types, fa_bwd.BWD_DQ_CONFIGS[head_dim]),
        ):
            for cfg in configs:
                consts = dict(HEAD_DIM=head_dim, CAUSAL=True, UPCAST=False, DOT_PRECISION="tf32")
                consts.update(cfg.kwargs)
                name = kernel.fn.__name__.removeprefix("_").removesuffix("_kernel")
                out.append(
                    Variant(
                        name,
                        _describe(cfg, head_dim, True),
                        kernel.fn,
                        types,
                        consts,
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
    return out


def _describe(cfg: triton.Config, head_dim: int, causal: bool) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"D={head_dim} causal={causal} {blocks} warps={cfg.num_warps} stages={cfg.num_stages}"


def all_variants() -> list[Variant]:
    return _rms_variants() + _ce_variants() + _attention_variants()


_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    match = _USAGE_RE.search(text)
    if match is None:
        raise RuntimeError(f"no resource usage line in cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, match.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_variant(v: Variant, arch: int) -> dict[str, Any]:
    start = time.perf_counter()
    compiled = triton.compile(
        _ast_source(v),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": v.num_warps, "num_stages": v.num_stages},
    )
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return {
        "kernel": v.name,
        "config": v.config,
        "arch": arch,
        "tags": v.tags,
        "shared": int(compiled.metadata.shared),
        "shared_limit": SHARED_LIMIT_BYTES[arch],
        "wgmma": "wgmma" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "seconds": round(time.perf_counter() - start, 2),
        **usage,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", type=Path, help="write the results here (default: stdout)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="compile only these kernel names (default: all)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one variant per kernel: the first config, at head_dim 128 for attention",
    )
    args = parser.parse_args(argv)
    if INTERPRET:
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    variants = all_variants()
    if args.only:
        variants = [v for v in variants if v.name in args.only]
    if args.smoke:
        seen: set[str] = set()
        variants = [
            v
            for v in variants
            if ("D=" not in v.config or "D=128 " in v.config)
            and not (v.name in seen or seen.add(v.name))
        ]
    results = [compile_variant(v, arch) for arch in args.arch for v in variants]
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
