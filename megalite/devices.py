"""The device table (peak FLOP/s, memory, interconnect, with the source of every figure) and the
compute precision a device should train in.

One table, read everywhere: MFU's denominator (metrics.resolve_peak), the planner's memory fit
and wall time (plan.py), the benchmark runner. A device name such as `torch.cuda.get_device_name`
returns ("NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3", "AMD Instinct MI300X") is matched against
the keys word by word, and the longest matching key wins, so "NVIDIA H200 NVL" is the NVL card and
"NVIDIA H200" the SXM one whatever order the rows are in.

Figures are dense (no 2:4 sparsity): where a datasheet prints only the sparse figure, the table
holds half of it and the source says so. Memory is GB as the vendor prints it (the common
variant; a size written in the device name wins, see plan.device_memory_gb). Interconnect is the
GPU-to-GPU bandwidth per GPU, bidirectional, as the vendor prints it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Device:
    key: str  # lower-case words matched against a device name
    name: str  # how the planner and the logs name it
    bf16_tflops: float  # dense bf16 tensor-core peak per device
    fp8_tflops: float | None  # dense fp8 peak; None: no fp8 tensor cores
    memory_gb: float
    interconnect: str
    interconnect_gb_s: float  # GPU-to-GPU bandwidth per GPU, bidirectional
    source: str  # where the figures come from


_H100 = "NVIDIA H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/"
_H200 = "NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/"
_MI300 = "https://www.amd.com/en/products/accelerators/instinct/mi300"

DEVICES: tuple[Device, ...] = (
    # Hopper. The datasheets print bf16 and fp8 with sparsity (1,979 and 3,958 TFLOP/s for SXM).
    Device("h100", "H100 SXM", 989.4, 1978.9, 80, "NVLink 4", 900,
           f"{_H100} (SXM column; sparse figures halved)"),
    Device("h100 pcie", "H100 PCIe", 756.0, 1513.0, 80, "PCIe Gen5 (NVLink bridge optional)", 128,
           f"{_H100} (PCIe column; sparse figures halved)"),
    Device("h100 nvl", "H100 NVL", 835.0, 1670.0, 94, "NVLink bridge", 600,
           f"{_H100} (NVL column; sparse figures halved)"),
    Device("h800", "H800 SXM", 989.4, 1978.9, 80, "NVLink 4 (export variant)", 400,
           "NVIDIA H800 product brief: H100 SXM compute with NVLink cut to 400 GB/s"),
    Device("h200", "H200 SXM", 989.4, 1978.9, 141, "NVLink 4", 900,
           f"{_H200} (SXM column: 1,979 bf16 / 3,958 fp8 sparse, halved)"),
    Device("h200 nvl", "H200 NVL", 835.0, 1670.0, 141, "2- or 4-way NVLink bridge", 900,
           f"{_H200} (NVL column: 1,671 bf16 / 3,341 fp8 sparse, halved)"),
    Device("gh200", "GH200", 989.4, 1978.9, 96, "NVLink 4 (+ NVLink-C2C to Grace)", 900,
           "NVIDIA GH200 Grace Hopper datasheet, "
           "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ (96 GB HBM3 variant)"),
    # Blackwell. NVIDIA prints these per GPU as dense figures.
    Device("b200", "B200 (HGX)", 2250.0, 4500.0, 180, "NVLink 5", 1800,
           "NVIDIA HGX B200 datasheet, https://www.nvidia.com/en-us/data-center/hgx/ (per GPU: "
           "2.25 PF dense bf16, 4.5 PF dense fp8; DGX B200: 1,440 GB over 8 GPUs)"),
    Device("gb200", "GB200 (NVL72)", 2500.0, 5000.0, 186, "NVLink 5", 1800,
           "NVIDIA GB200 NVL72 datasheet, https://www.nvidia.com/en-us/data-center/gb200-nvl72/ "
           "(rack figures / 72 GPUs: 180 PF dense bf16, 13.4 TB HBM3e)"),
    # Ampere and Ada.
    Device("a100", "A100", 312.0, None, 80, "NVLink 3", 600,
           "NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/"),
    Device("a800", "A800", 312.0, None, 80, "NVLink 3 (export variant)", 400,
           "NVIDIA A800 product brief: A100 compute with NVLink cut to 400 GB/s"),
    Device("l40s", "L40S", 362.1, 733.0, 48, "PCIe Gen4 (no NVLink)", 64,
           "NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/ "
           "(sparse figures halved)"),
    Device("l4", "L4", 121.0, 242.0, 24, "PCIe Gen4 (no NVLink)", 64,
           "NVIDIA L4 datasheet, https://www.nvidia.com/en-us/data-center/l4/ "
           "(sparse figures halved)"),
    Device("a10", "A10", 125.0, None, 24, "PCIe Gen4 (no NVLink)", 64,
           "NVIDIA A10 datasheet, https://www.nvidia.com/en-us/data-center/products/a10-gpu/ "
           "(sparse figure halved)"),
    Device("a10g", "A10G", 70.0, None, 24, "PCIe Gen4 (no NVLink)", 64,
           "AWS-only A10 variant (EC2 G5), no NVIDIA datasheet; 70 TFLOP/s as compared in "
           "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/"),
    # AMD CDNA. AMD prints dense figures; 7 Infinity Fabric links x 128 GB/s on MI300X/MI325X.
    Device("mi300x", "MI300X", 1307.4, 2614.9, 192, "Infinity Fabric (7 links)", 896,
           f"AMD Instinct MI300X data sheet, {_MI300}/mi300x.html"),
    Device("mi325x", "MI325X", 1307.4, 2614.9, 256, "Infinity Fabric (7 links)", 896,
           f"AMD Instinct MI325X data sheet, {_MI300}/mi325x.html"),
    Device("mi250x", "MI250X", 383.0, None, 128, "Infinity Fabric (8 links)", 800,
           "AMD Instinct MI250X data sheet, "
           "https://www.amd.com/en/products/accelerators/instinct/mi200/mi250x.html"),
)  # fmt: skip

PEAK_PRECISIONS = ("bf16", "fp8")


def _words(text: str) -> str:
    """Lower-case words separated by single spaces, padded: ' nvidia a100 sxm4 80gb '."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def lookup_device(device_name: str) -> Device | None:
    """The table's row for a device name, or None. A key matches when its words appear in the
    name as whole, consecutive words; of several matches the longest key wins (so 'NVIDIA H200
    NVL' is the NVL card, 'NVIDIA GH200' not an H200)."""
    name = _words(device_name)
    matches = [d for d in DEVICES if _words(d.key) in name]
    return max(matches, key=lambda d: len(d.key), default=None)


def match_device(device_name: str) -> str | None:
    """The key of the table row a device name matches, or None."""
    device = lookup_device(device_name)
    return device.key if device else None


def lookup_peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """The table's dense peak for a device name such as 'NVIDIA H100 80GB HBM3', or None (a
    device missing from the table, or one without fp8 when precision='fp8')."""
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PEAK_PRECISIONS)}")
    device = lookup_device(device_name)
    if device is None:
        return None
    return device.fp8_tflops if precision == "fp8" else device.bf16_tflops


# ------------------------------------------------------------------------------ precision
PRECISIONS = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of bf16 matmul hardware: AVX512-BF16 and AMX on x86, the BF16 extension on
# Arm. Without one, oneDNN has no bf16 GEMM and torch falls back to a scalar loop (a 512^3 bf16
# matmul ran at 0.6 GFLOP/s against 32.8 in fp32 on an AVX2-only EPYC).
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else None


def native_bf16(flags: set[str] | None, onednn_bf16: bool, capability: str) -> tuple[bool, str]:
    """(whether a CPU multiplies bf16 in hardware, a few words saying how we know), from its
    /proc/cpuinfo flags (None: not Linux), oneDNN's bf16 check and torch's CPU capability."""
    if flags is None:  # oneDNN's own check is all there is
        return onednn_bf16, f"oneDNN bf16 support {'yes' if onednn_bf16 else 'no'}, {capability}"
    found = [f for f in _BF16_FLAGS if f in flags]
    # oneDNN also reports bf16 "supported" on plain AVX-512, by emulating it no faster than fp32:
    # a bf16 flag is required as well.
    if found and onednn_bf16:
        return True, ", ".join(found)
    return False, f"{capability} only" if not found else f"{', '.join(found)} but no oneDNN bf16"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> tuple[bool, str]:
    """`native_bf16` for this machine's CPU."""
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        onednn = False
    return native_bf16(_cpuinfo_flags(), onednn, torch.backends.cpu.get_cpu_capability())


def resolve_precision(precision: str, device_type: str) -> tuple[str, str]:
    """The concrete `train.precision` (bf16 or fp32) for a device type, and one line saying why,
    for the start-up log: `auto` is bf16 on GPUs and on CPUs with native bf16, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if device_type != "cpu":
        if precision == "auto":
            return "bf16", f"precision auto -> bf16 on {device_type}"
        return precision, f"precision {precision} (train.precision)"
    native, why = cpu_has_native_bf16()
    if precision == "auto":
        if native:
            return "bf16", f"precision auto -> bf16: this CPU has native bf16 ({why})"
        return "fp32", f"precision auto -> fp32: this CPU has no native bf16 ({why})"
    if precision == "bf16" and not native:
        return "bf16", (
            f"precision bf16 (train.precision), but this CPU has no native bf16 ({why}): bf16 "
            "matmuls are emulated, many times slower than fp32; train.precision=auto picks fp32"
        )
    return precision, f"precision {precision} (train.precision)"
