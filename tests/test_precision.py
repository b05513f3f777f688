"""`train.precision=auto`: bf16 on GPUs and on CPUs with native bf16, fp32 otherwise, resolved
once by preflight so that nothing downstream sees `auto`."""

from __future__ import annotations

import pytest

from megalite import devices
from megalite.devices import native_bf16, resolve_precision
from megalite.preflight import preflight
from tests.conftest import compose, tiny_train_overrides

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Sets what the native-bf16 detector reports for this CPU."""

    def set_native(native: bool) -> None:
        why = "amx_bf16" if native else "AVX2 only"
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: (native, why))

    return set_native


def test_native_bf16_needs_a_bf16_flag_and_onednn():
    assert native_bf16(AVX2, False, "AVX2") == (False, "AVX2 only")
    # oneDNN emulates bf16 on plain AVX-512 (no faster than fp32): not native.
    assert native_bf16(AVX512, True, "AVX512") == (False, "AVX512 only")
    assert native_bf16(AVX512 | {"avx512_bf16"}, True, "AVX512") == (True, "avx512_bf16")
    assert native_bf16(AVX512 | {"amx_bf16", "avx512_bf16"}, True, "AVX512")[0]
    assert native_bf16({"fp", "asimd", "bf16"}, True, "DEFAULT") == (True, "bf16")  # Arm
    assert native_bf16({"avx512_bf16"}, False, "AVX512")[0] is False
    # No /proc/cpuinfo (not Linux): oneDNN's check decides.
    assert native_bf16(None, True, "AVX512")[0] and not native_bf16(None, False, "AVX2")[0]


def test_auto_follows_the_cpu(cpu_bf16):
    cpu_bf16(False)
    assert resolve_precision("auto", "cpu") == (
        "fp32",
        "precision auto -> fp32: this CPU has no native bf16 (AVX2 only)",
    )
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu") == (
        "bf16",
        "precision auto -> bf16: this CPU has native bf16 (amx_bf16)",
    )


@pytest.mark.parametrize("native", [False, True])
def test_auto_is_bf16_on_cuda_whatever_the_cpu(cpu_bf16, native):
    cpu_bf16(native)
    assert resolve_precision("auto", "cuda") == ("bf16", "precision auto -> bf16 on cuda")
    assert resolve_precision("fp32", "cuda")[0] == "fp32"


def test_explicit_precision_is_kept_and_slow_bf16_is_said(cpu_bf16):
    cpu_bf16(False)
    assert resolve_precision("fp32", "cpu") == ("fp32", "precision fp32 (train.precision)")
    precision, why = resolve_precision("bf16", "cpu")
    assert precision == "bf16" and "no native bf16 (AVX2 only)" in why
    assert "train.precision=auto picks fp32" in why
    cpu_bf16(True)
    assert resolve_precision("bf16", "cpu") == ("bf16", "precision bf16 (train.precision)")
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        resolve_precision("fp16", "cpu")


def test_auto_is_the_default():
    assert compose([]).train.precision == "auto"


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_preflight_returns_a_concrete_precision(tiny_data, tmp_path, cpu_bf16, native, expected):
    cpu_bf16(native)
    cfg = compose(tiny_train_overrides(tiny_data, tmp_path / "run", precision="auto", device="cpu"))
    assert cfg.train.precision == "auto"
    plan = preflight(cfg, 1)
    assert plan.cfg.train.precision == expected
    assert plan.precision_reason.startswith(f"precision auto -> {expected}: this CPU has")
