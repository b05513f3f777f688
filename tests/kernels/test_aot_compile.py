"""GPU build fidelity without a GPU: every kernel and autotune config compiles for sm_80 and sm_90.

Two modes: "smoke" (default run, ~15 s) builds the first config of every kernel, at head_dim 128
for attention; "all" (``-m slow``, ~1-2 min) builds every autotune config and launch-table row.

The builds run in a subprocess with TRITON_INTERPRET removed from its environment: in this test
process the interpreter is on, so ``triton.jit`` has returned ``InterpretedFunction`` objects that
``triton.compile`` cannot take (and the decision is made once, when the kernel modules import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (kernel, config substring) -> why a small spill is accepted there.
ACCEPTED_SPILLS = {
    ("rms_norm_bwd", "C=16384"): "a 16K-wide row held in registers; <= 128 B of stack at 32 warps",
}
MAX_ACCEPTED_SPILL_BYTES = 128


@pytest.fixture(scope="module", params=["smoke", pytest.param("all", marks=pytest.mark.slow)])
def aot_mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def aot_results(aot_mode, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extra = ["--smoke"] if aot_mode == "smoke" else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megalite.kernels._aot",
            "--arch",
            "80",
            "90",
            "--json",
            str(out),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"AOT build failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(Path(out).read_text())
    _print_table(results)
    return results


def _print_table(results: list[dict]) -> None:
    print(f"\n{'kernel':<40} {'config':<62} {'sm':>3} {'regs':>5} {'shared B':>9} {'spill B':>8}")
    for r in results:
        shared = r["shared"] + r["static_shared"]
        spill = r["stack"] + r["local"]
        name, config = r["kernel"], r["config"]
        print(f"{name:<40} {config:<62} {r['arch']:>3} {r['regs']:>5} {shared:>9} {spill:>8}")


def test_every_kernel_builds_for_both_archs(aot_results) -> None:
    kernels = {
        "rms_norm_fwd",
        "rms_norm_bwd",
        "cross_entropy_fwd",
        "cross_entropy_bwd",
        "cross_entropy_fwd+grad (fused linear CE)",
        "attn_fwd",
        "attn_bwd_preprocess",
        "attn_bwd_dkdv",
        "attn_bwd_dq",
    }
    for arch in (80, 90):
        built = {r["kernel"] for r in aot_results if r["arch"] == arch}
        assert built == kernels, (
            f"sm_{arch}: missing {kernels - built}, unexpected {built - kernels}"
        )
    per_arch = [
        sorted((r["kernel"], r["config"]) for r in aot_results if r["arch"] == a) for a in (80, 90)
    ]
    assert per_arch[0] == per_arch[1], "both archs must build the same variants"


def test_every_autotune_config_is_built(aot_results, aot_mode) -> None:
    """ "all": one build per (head_dim, config) of each attention autotune table, per arch;
    "smoke": exactly one build per kernel per arch."""
    if aot_mode == "smoke":
        for arch in (80, 90):
            names = [r["kernel"] for r in aot_results if r["arch"] == arch]
            assert len(names) == len(set(names))
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from megalite.kernels import flash_attention_bwd as bwd, flash_attention_fwd as fwd\n"
        "print(sum(len(t[d]) for t in (fwd.FWD_CONFIGS, bwd.BWD_DKDV_CONFIGS, bwd.BWD_DQ_CONFIGS)"
        " for d in fwd.SUPPORTED_HEAD_DIMS))"
    )
    n_configs = int(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    for arch in (80, 90):
        attn = [
            r
            for r in aot_results
            if r["arch"] == arch and r["kernel"] in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
        ]
        causal_attn = [r for r in attn if "causal=True" in r["config"]]
        assert len(causal_attn) == n_configs


def test_shared_memory_fits(aot_results) -> None:
    for r in aot_results:
        total = r["shared"] + r["static_shared"]
        assert total <= r["shared_limit"], (
            f"{r['kernel']} [{r['config']}] on sm_{r['arch']} needs {total} B of shared memory, "
            f"limit {r['shared_limit']} B"
        )


def test_no_register_spills(aot_results) -> None:
    for r in aot_results:
        spill = r["stack"] + r["local"]
        accepted = any(
            r["kernel"] == name and part in r["config"] for name, part in ACCEPTED_SPILLS
        )
        limit = MAX_ACCEPTED_SPILL_BYTES if accepted else 0
        assert spill <= limit, (
            f"{r['kernel']} [{r['config']}] on sm_{r['arch']}: {r['regs']} registers and "
            f"{spill} B spilled (limit {limit} B)"
        )


def test_attention_uses_tensor_cores(aot_results) -> None:
    """sm_90 builds use Hopper's wgmma; sm_80 builds use mma.sync (Ampere tensor cores)."""
    for r in aot_results:
        if not r["kernel"].startswith("attn_") or r["kernel"] == "attn_bwd_preprocess":
            continue
        if r["arch"] == 90:
            assert r["wgmma"], f"{r['kernel']} [{r['config']}] sm_90 PTX has no wgmma"
        else:
            assert r["mma_sync"] and not r["wgmma"], f"{r['kernel']} [{r['config']}] sm_80 PTX"


def test_autotune_prunes_to_the_head_dim_table() -> None:
    """On a GPU the attention autotuners benchmark only their head dim's row of the table."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from megalite.kernels import flash_attention_bwd as bwd, flash_attention_fwd as fwd\n"
        "for kernel, table in ((fwd._attn_fwd_kernel, fwd.FWD_CONFIGS),\n"
        "                      (bwd._attn_bwd_dkdv_kernel, bwd.BWD_DKDV_CONFIGS),\n"
        "                      (bwd._attn_bwd_dq_kernel, bwd.BWD_DQ_CONFIGS)):\n"
        "    kernel.nargs = {}  # set by Autotuner.run before it prunes\n"
        "    for d, row in table.items():\n"
        "        kept = kernel.prune_configs({'HEAD_DIM': d})\n"
        "        assert {id(c) for c in kept} == {id(c) for c in row}, (kernel, d)\n"
        "        assert len(kept) < len(kernel.configs) or len(row) == len(kernel.configs)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
