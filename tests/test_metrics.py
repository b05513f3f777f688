"""The peak table, MFU inputs, the metric sinks (FLOPs per token: tests/test_shapes.py)."""

from __future__ import annotations

import json

import pytest
import torch

from megalite import metrics
from megalite.config import WandbConfig
from megalite.devices import DEVICES, lookup_device, lookup_peak_tflops
from megalite.metrics import (
    MetricsLogger,
    Peak,
    PeakWarning,
    mfu_warning,
    peak_memory_gb,
    peak_warnings,
    plot_losses,
    redact,
    reset_peak_memory,
)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("AMD Instinct MI300X", 1307.4),
        ("AMD Instinct MI325X", 1307.4),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", 70.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table_lookup(name, tflops):
    assert lookup_peak_tflops(name) == tflops


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 1978.9),
        ("NVIDIA H100 PCIe", 1513.0),
        ("NVIDIA B200", 4500.0),
        ("AMD Instinct MI300X", 2614.9),
        ("NVIDIA A100-SXM4-80GB", None),  # Ampere has no fp8 tensor cores
        ("Tesla T4", None),
    ],
)
def test_fp8_peak_lookup(name, tflops):
    assert lookup_peak_tflops(name, "fp8") == tflops


@pytest.mark.parametrize(
    "name, key, memory_gb, interconnect_gb_s",
    [
        # torch.cuda.get_device_name of each variant: the NVL card must not read as the SXM one.
        ("NVIDIA H200", "h200", 141, 900),
        ("NVIDIA H200 NVL", "h200 nvl", 141, 900),
        ("NVIDIA H100 80GB HBM3", "h100", 80, 900),
        ("NVIDIA H100 NVL", "h100 nvl", 94, 600),
        ("NVIDIA GH200 480GB", "gh200", 96, 900),
        ("NVIDIA B200", "b200", 180, 1800),
        ("NVIDIA GB200", "gb200", 186, 1800),
        ("AMD Instinct MI300X", "mi300x", 192, 896),
        ("AMD Instinct MI325X", "mi325x", 256, 896),
        ("NVIDIA A10G", "a10g", 24, 64),
    ],
)
def test_device_table_distinguishes_variants(name, key, memory_gb, interconnect_gb_s):
    device = lookup_device(name)
    assert device is not None and device.key == key
    assert (device.memory_gb, device.interconnect_gb_s) == (memory_gb, interconnect_gb_s)


def test_device_table_rows_are_complete_and_order_free():
    keys = [d.key for d in DEVICES]
    assert len(keys) == len(set(keys))
    for d in DEVICES:
        # Every figure has a source: a vendor URL, or a product brief named for what it says.
        assert "https://" in d.source or "product brief" in d.source, d.key
        assert d.bf16_tflops > 0 and d.memory_gb > 0 and d.interconnect_gb_s > 0, d.key
        # Each key finds its own row, whatever rows come before it (longest match wins).
        assert lookup_device(f"Vendor {d.key.upper()} 99 Edition") is d, d.key


def test_fp8_peaks_are_about_twice_bf16():
    for d in DEVICES:
        if d.fp8_tflops is not None:
            assert d.fp8_tflops / d.bf16_tflops == pytest.approx(2.0, rel=0.02), d.key
    with pytest.raises(ValueError, match="precision='fp4'"):
        lookup_peak_tflops("NVIDIA H100", "fp4")


def test_peak_warnings_flag_a_wrong_table():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_warnings(Peak(989.4, "table", h100, probe_tflops=700.0), on_gpu=True) == []
    (over,) = peak_warnings(Peak(989.4, "table", h100, probe_tflops=1200.0), on_gpu=True)
    assert "exceed 100 %" in over and "logging.peak_tflops" in over
    (low,) = peak_warnings(Peak(989.4, "table", h100, probe_tflops=150.0), on_gpu=True)
    assert "15%" in low and "PCIe" in low
    (cfg_low,) = peak_warnings(Peak(100.0, "config", h100, probe_tflops=700.0), on_gpu=True)
    assert "logging.peak_tflops (100 TFLOP/s)" in cfg_low
    (missing,) = peak_warnings(Peak(300.0, "measured", "NVIDIA T4", 300.0), on_gpu=True)
    assert "not in megalite's peak table" in missing and "devices.py" in missing
    # A CPU has no table entry by design: its measured peak is the reference, no warning.
    assert peak_warnings(Peak(0.2, "measured", "CPU x86_64", 0.2), on_gpu=False) == []


def test_resolve_peak_probes_a_gpu_and_warns(monkeypatch):
    """The start-up probe's wiring, with the GEMM and the device name faked (no GPU here)."""
    monkeypatch.setattr(metrics, "measure_matmul_tflops", lambda device, dtype, n, repeats: 2000.0)
    monkeypatch.setattr(metrics, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    with pytest.warns(PeakWarning, match="exceed 100 %"):
        peak = metrics.resolve_peak(torch.device("cuda"), torch.bfloat16, None)
    assert (peak.tflops, peak.source, peak.probe_tflops) == (989.4, "table", 2000.0)
    assert "GEMM probe 2e+03 TFLOP/s = 202% of it" in peak.label
    monkeypatch.setattr(metrics, "device_name", lambda device: "NVIDIA Quantum X1")
    with pytest.warns(PeakWarning, match="not in megalite's peak table"):
        peak = metrics.resolve_peak(torch.device("cuda"), torch.bfloat16, None)
    assert (peak.tflops, peak.source) == (2000.0, "measured")


def test_cpu_peak_cache_keeps_the_best_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGALITE_CACHE_DIR", str(tmp_path))
    assert metrics.best_cpu_peak("cpu A x2 float32", 0.30) == 0.30
    # A probe taken while other work holds the cores reads low: the best one stays the peak.
    assert metrics.best_cpu_peak("cpu A x2 float32", 0.05) == 0.30
    assert metrics.best_cpu_peak("cpu A x2 float32", 0.40) == 0.40
    # Another thread count or dtype is another machine state with its own entry.
    assert metrics.best_cpu_peak("cpu A x1 float32", 0.10) == 0.10
    cached = json.loads((tmp_path / metrics.CPU_PEAK_FILE).read_text())
    assert cached == {"cpu A x2 float32": 0.40, "cpu A x1 float32": 0.10}
    # A damaged cache is no error: the probe is the peak and the file is rewritten.
    (tmp_path / metrics.CPU_PEAK_FILE).write_text("{not json")
    assert metrics.best_cpu_peak("cpu A x2 float32", 0.20) == 0.20
    assert json.loads((tmp_path / metrics.CPU_PEAK_FILE).read_text()) == {"cpu A x2 float32": 0.2}


def test_resolve_peak_on_cpu_probes_in_the_run_dtype_and_uses_the_cached_best(
    tmp_path, monkeypatch
):
    """The CPU wiring, with the GEMM faked: a high probe, then a low one (a busy machine)."""
    monkeypatch.setenv("MEGALITE_CACHE_DIR", str(tmp_path))
    probes = iter([0.5, 0.1])
    dtypes = []

    def fake_probe(device, dtype, n, repeats):
        dtypes.append(dtype)
        return next(probes)

    monkeypatch.setattr(metrics, "measure_matmul_tflops", fake_probe)
    cpu = torch.device("cpu")
    first = metrics.resolve_peak(cpu, torch.float32, None)
    second = metrics.resolve_peak(cpu, torch.float32, None)
    assert dtypes == [torch.float32, torch.float32]
    assert (first.tflops, first.source, first.probe_tflops) == (0.5, "measured", 0.5)
    assert (second.tflops, second.source, second.probe_tflops) == (0.5, "measured", 0.1)
    assert "best probe on this machine; this run's 0.1" in second.label
    # A configured peak skips the probe on a CPU.
    assert metrics.resolve_peak(cpu, torch.float32, 2.0).source == "config"
    assert len(dtypes) == 2


def test_mfu_over_100_percent_is_flagged():
    peak = Peak(0.1, "measured", "CPU")
    assert mfu_warning(0.95, peak) is None
    assert "MFU 120% exceeds 100 %" in mfu_warning(1.2, peak)


def test_reset_peak_memory_restarts_the_cpu_peak():
    x = torch.ones(64 * 2**20)  # 256 MB, touched
    del x
    before = peak_memory_gb(torch.device("cpu"))
    assert reset_peak_memory(torch.device("cpu"))
    after = peak_memory_gb(torch.device("cpu"))
    assert after < before - 0.2


def test_redact_drops_secrets():
    cfg = {"logging": {"wandb": {"api_key": "abc123", "project": "p"}}, "token_budget": 5}
    out = redact(cfg)
    assert out["logging"]["wandb"]["api_key"] == "<redacted>"
    assert out["logging"]["wandb"]["project"] == "p" and out["token_budget"] == 5


def test_jsonl_sink_and_plot(tmp_path, capsys):
    logger = MetricsLogger(
        tmp_path, enabled=True, console=True, jsonl=True, wandb_cfg=WandbConfig(), config={}
    )
    rec = dict(
        step=1,
        loss=5.0,
        lr=1e-3,
        grad_norm=1.0,
        tokens=100,
        tokens_per_s=10.0,
        tflops_per_device=0.1,
        mfu=0.5,
        mem_gb=1.0,
    )
    logger.log(rec)
    logger.log({"step": 1, "val_loss": 4.0, "val_ppl": 54.6, "tokens": 100})
    assert "loss 5.0000" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == rec and lines[1]["val_loss"] == 4.0
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png", baseline=6.0)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_sink_writes_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(
        tmp_path,
        enabled=True,
        console=False,
        jsonl=False,
        wandb_cfg=WandbConfig(mode="offline", project="t"),
        config={"a": 1},
    )
    logger.log({"step": 1, "val_loss": 4.0, "val_ppl": 54.6, "tokens": 100})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
