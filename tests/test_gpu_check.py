"""`megalite-gpu-check`: the --smoke flow end to end on the CPU (so the GPU check cannot rot),
its usage errors, and that its verdicts can fail."""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest
import torch

from tests.conftest import PYTHON, run_cli

KERNEL_TENSORS = {
    "rms_norm": ["y", "dx", "dweight"],
    "cross_entropy": ["loss", "dlogits"],
    "fused_linear_cross_entropy": ["loss", "dhidden", "dweight"],
    "flash_attention": ["out", "dq", "dk", "dv"],
}
LAYOUTS = ["single", "ddp", "fsdp", "fsdp_accum", "zero3"]
PERF = [
    "baseline",
    "attention=triton",
    "attention=flash_attn",
    "norm=triton",
    "loss=fused_linear",
    "compile",
]


def _read(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_smoke_runs_every_check_and_every_row_passes(tmp_path):
    out = tmp_path / "check"
    res = run_cli([PYTHON, "-m", "megalite.gpu_check", "--smoke", "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _read(out / "gpu_check.csv")

    kernels = [r for r in rows if r["section"] == "kernels"]
    for kernel, tensors in KERNEL_TENSORS.items():
        for dtype in ("fp32", "bf16"):
            seen = {r["tensor"] for r in kernels if r["kernel"] == kernel and r["dtype"] == dtype}
            assert seen == set(tensors), (kernel, dtype, seen)
    autocast = [r for r in kernels if r["shape"].endswith("autocast")]
    assert {r["tensor"] for r in autocast} == {"loss", "dhidden", "dweight"}
    for r in kernels:
        assert float(r["max_abs_err"]) <= float(r["tolerance"]), r

    train = {r["layout"]: r for r in rows if r["section"] == "train"}
    assert list(train) == LAYOUTS
    for layout, r in train.items():
        if layout == "zero3" and r["status"] == "skip":
            continue
        assert r["group"] == "gloo x1" and int(r["collectives"]) > 0, r
        assert math.isfinite(float(r["final_loss"])) and r["loss_falls"] == "True", r
        # One process, same seed and data: every layout is the same computation.
        assert abs(float(r["final_loss"]) - float(train["single"]["final_loss"])) < 1e-2, r

    (compiled,) = [r for r in rows if r["section"] == "compile"]
    assert int(compiled["frames_compiled"]) > 0 and compiled["recompiles_after_step1"] == "0"

    perf = {r["variant"]: r for r in rows if r["section"] == "perf"}
    assert list(perf) == PERF
    for r in perf.values():
        if r["status"] == "pass":
            assert float(r["tokens_per_s"]) > 0 and float(r["peak_mem_gb"]) > 0, r

    # Skipped only for an optional package that is not installed here; nothing fails.
    allowed_skips = set()
    if importlib.util.find_spec("deepspeed") is None:
        allowed_skips.add("train zero3")
    if importlib.util.find_spec("flash_attn") is None:
        allowed_skips.add("perf attention=flash_attn")
    for r in rows:
        expected = "skip" if r["check"] in allowed_skips else "pass"
        assert r["status"] == expected, r
    for title in (
        "(a) Triton kernels",
        "(b) 30 training steps",
        "(c) torch.compile",
        "(d) throughput",
    ):
        assert title in res.stdout
    assert (out / "gpu_check.md").read_text().strip() in res.stdout


def test_a_kernel_off_its_reference_fails_the_check(tmp_path, monkeypatch, capsys):
    """The check can fail: an RMSNorm kernel 1 % off fails its rows and the exit status."""
    from megalite.kernels import rms_norm as module

    from megalite import gpu_check

    right = module.rms_norm
    monkeypatch.setattr(module, "rms_norm", lambda x, w, eps=1e-6: right(x, w, eps) * 1.01)
    ctx = gpu_check.Context(True, gpu_check.SMOKE, torch.device("cpu"), tmp_path)
    assert gpu_check.run(ctx, ["kernels"]) == 1
    rows = _read(tmp_path / "gpu_check.csv")
    failed = {(r["kernel"], r["dtype"], r["tensor"]) for r in rows if r["status"] == "fail"}
    assert {("rms_norm", "fp32", "y"), ("rms_norm", "fp32", "dx")} <= failed
    assert all(k == "rms_norm" for k, _, _ in failed)
    assert "exceeds the tolerance" in capsys.readouterr().out


def test_loss_verdict_needs_a_finite_falling_loss():
    from megalite.gpu_check_train import loss_verdict

    assert loss_verdict([6.0 - 0.05 * i for i in range(30)])[:2] == (True, True)
    finite, falls, reason = loss_verdict([6.0] * 30)
    assert finite and not falls and "did not fall" in reason
    losses = [6.0 - 0.05 * i for i in range(30)]
    losses[12] = float("nan")
    finite, falls, reason = loss_verdict(losses)
    assert not finite and not falls and "step 13" in reason


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--smoke", "--only", "kernels,bogus"],
            "'bogus' is not one of kernels, train, compile, perf",
        ),
        ([], "TRITON_INTERPRET=1 is set"),
    ],
)
def test_bad_usage_exits_2_with_the_reason(argv, message, tmp_path, capsys):
    from megalite.gpu_check import main

    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_the_full_check_points_to_smoke(tmp_path, monkeypatch, capsys):
    from megalite.gpu_check import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device here; --smoke runs the same flow on the CPU" in capsys.readouterr().err
