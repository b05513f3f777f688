"""Peak FLOP/s by device, MFU, and the metric sinks (console, jsonl, wandb).

The FLOPs MFU counts (model FLOPs per token, and the hardware FLOPs of HFU, with
activation checkpointing's recompute) and their convention are in megalite/shapes.py.

MFU = achieved model FLOP/s per device / peak dense bf16 FLOP/s of that device;
HFU = achieved hardware FLOP/s per device / the same peak. Without recompute they are equal.

Peak detection: the CUDA device name (`torch.cuda.get_device_name`) is looked up in the device
table (megalite/devices.py; `logging.peak_tflops` overrides). On a GPU a short GEMM probe (bf16
4096^3 matmuls) measures the achieved matmul TFLOP/s at start-up and warns when the table looks
wrong: a probe above the peak (an MFU over 100 % would follow), far below it (another variant of
the card, or a throttled or shared GPU), or a device missing from the table. CPUs and unknown
devices use a measured GEMM peak. On a CPU that is the best probe ever measured on this machine
(CPU model, thread count, dtype) in the run's precision, cached in `cache_dir()`: a probe taken
while other work holds the cores reads low and would push MFU over 100 %.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalite.devices import lookup_peak_tflops
from megalite.rundir import RunDir


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8
) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on this device, best of `repeats` runs (a peak:
    the best run is the one least disturbed by other work on the machine)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (allocations, kernel selection)
    # A GPU matmul takes well under a millisecond: time several between synchronizations so the
    # launch and sync overhead does not count.
    inner = 10 if device.type == "cuda" else 1
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n**3 / min(times) / 1e12


class PeakWarning(UserWarning):
    """The peak FLOP/s that MFU divides by looks wrong for this device."""


# A probe below this fraction of the table's peak suggests the wrong table entry (e.g. an SXM
# peak for a PCIe card) or a throttled or shared GPU: a large bf16 GEMM reaches 60-90 % of the
# datasheet peak on the GPUs in the table (MI300X ~45 %).
PROBE_LOW_FRACTION = 0.3


@dataclass
class Peak:
    tflops: float
    source: str  # "table", "config" or "measured"
    device_name: str
    # Achieved bf16 GEMM TFLOP/s of the start-up probe (None when it did not run).
    probe_tflops: float | None = None

    @property
    def label(self) -> str:
        base = {
            "table": f"vs {self.device_name} datasheet bf16 peak {self.tflops:g} TFLOP/s",
            "config": f"vs configured peak {self.tflops:g} TFLOP/s",
            "measured": f"vs measured {self.device_name} GEMM peak {self.tflops:.3g} TFLOP/s",
        }[self.source]
        if self.source == "measured" and self.probe_tflops not in (None, self.tflops):
            base += f" (best probe on this machine; this run's {self.probe_tflops:.3g})"
        if self.probe_tflops is not None and self.source != "measured":
            base += (
                f" (GEMM probe {self.probe_tflops:.3g} TFLOP/s = "
                f"{100 * self.probe_tflops / self.tflops:.0f}% of it)"
            )
        return base


def peak_warnings(peak: Peak, on_gpu: bool) -> list[str]:
    """Why the peak MFU divides by looks wrong, if it does (empty list: it looks right)."""
    out = []
    fix = "set logging.peak_tflops=<the datasheet's dense bf16 TFLOP/s for this device>"
    what = {"table": "the peak table's entry", "config": "logging.peak_tflops"}.get(peak.source)
    if on_gpu and peak.source == "measured":
        out.append(
            f"device {peak.device_name!r} is not in megalite's peak table "
            "(megalite/devices.py DEVICES), so MFU divides by the measured GEMM peak "
            f"{peak.tflops:.3g} TFLOP/s and reads higher than a datasheet MFU; {fix}"
        )
    if peak.probe_tflops is not None and what is not None:
        if peak.probe_tflops > peak.tflops:
            out.append(
                f"the GEMM probe reached {peak.probe_tflops:.4g} TFLOP/s on "
                f"{peak.device_name!r}, above {what} ({peak.tflops:g} TFLOP/s): MFU would exceed "
                f"100 %; {fix}"
            )
        elif on_gpu and peak.probe_tflops < PROBE_LOW_FRACTION * peak.tflops:
            out.append(
                f"the GEMM probe reached only {peak.probe_tflops:.4g} TFLOP/s on "
                f"{peak.device_name!r}, {100 * peak.probe_tflops / peak.tflops:.0f}% of "
                f"{what} ({peak.tflops:g} TFLOP/s): another variant of the card (SXM vs PCIe), "
                f"or a throttled or shared GPU; if the entry is wrong, {fix}"
            )
    return out


def mfu_warning(mfu: float, peak: Peak) -> str | None:
    """A measured MFU over 100 % means the peak is wrong (or the FLOP count is)."""
    if mfu <= 1.0:
        return None
    return (
        f"MFU {100 * mfu:.0f}% exceeds 100 % of the {peak.source} peak {peak.tflops:.4g} TFLOP/s "
        f"on {peak.device_name!r}: the peak is too low; set logging.peak_tflops to the device's "
        "dense bf16 peak"
    )


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), else the architecture ("x86_64")."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    m = re.search(r"^(?:model name|Model Name|Hardware)\s*:\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} x{torch.get_num_threads()} threads"


def cache_dir() -> Path:
    """Where megalite keeps small per-machine facts: $MEGALITE_CACHE_DIR, else ~/.cache/megalite."""
    return Path(os.environ.get("MEGALITE_CACHE_DIR") or Path.home() / ".cache" / "megalite")


CPU_PEAK_FILE = "cpu_peak.json"


def best_cpu_peak(key: str, probe: float) -> float:
    """The best GEMM TFLOP/s ever measured under `key` (CPU model, threads, dtype), this probe
    included; the probe is stored when it beats the cached value. A cache that cannot be read or
    written is treated as empty: the probe alone is then the peak."""
    path = cache_dir() / CPU_PEAK_FILE
    try:
        cached = json.loads(path.read_text())
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):
        cached = {}
    best = cached.get(key)
    if isinstance(best, (int, float)) and best >= probe:
        return float(best)
    cached[key] = probe
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Ranks of one job may write at once: each writes its own file and renames it over.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return probe


def _cpu_probe_size(dtype: torch.dtype, budget_s: float = 0.25) -> int:
    """The largest of 1024, 512, 256 whose matmul takes about `budget_s` or less here: a bf16
    matmul on a CPU without native bf16 runs ~50x slower than fp32, and a 1024^3 one would make
    the probe take half a minute."""
    a = torch.randn(256, 256, dtype=dtype)
    a @ a
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    t256 = min(times)
    for n in (1024, 512):
        if t256 * (n / 256) ** 3 <= budget_s:
            return n
    return 256


def resolve_peak(device: torch.device, dtype: torch.dtype, override: float | None) -> Peak:
    """Configured peak, else the table for known GPUs, else a measured matmul peak (CPUs).

    On a GPU a short bf16 GEMM probe always runs, and a `PeakWarning` is issued when the peak
    looks wrong against it (`peak_warnings`). On a CPU the probe runs in `dtype` (the run's
    precision) only when no peak is configured, and the peak is the best probe ever measured on
    this machine at this thread count and dtype (`best_cpu_peak`), so a probe slowed by other
    work on the cores cannot make MFU exceed 100 %."""
    name = device_name(device)
    on_gpu = device.type == "cuda"
    probe = None
    if on_gpu:
        probe = measure_matmul_tflops(device, torch.bfloat16, n=4096, repeats=10)
    elif override is None:
        n = _cpu_probe_size(dtype)
        probe = measure_matmul_tflops(device, dtype, n=n, repeats=8)
    table = lookup_peak_tflops(name) if on_gpu else None
    if override is not None:
        peak = Peak(override, "config", name, probe)
    elif table is not None:
        peak = Peak(table, "table", name, probe)
    else:
        assert probe is not None
        best = probe
        if not on_gpu:
            best = best_cpu_peak(f"{name} {str(dtype).removeprefix('torch.')}", probe)
        peak = Peak(best, "measured", name, probe)
    for msg in peak_warnings(peak, on_gpu):
        warnings.warn(msg, PeakWarning, stacklevel=2)
    return peak


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20


def reset_peak_memory(device: torch.device) -> bool:
    """Restarts the peak that `peak_memory_gb` reports from the current usage, so one process can
    measure several runs (a benchmark grid). On a CPU this resets the process's peak RSS through
    /proc/self/clear_refs (Linux); returns False where that is not possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------------- sinks
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Drops values whose key looks like a secret, so configs and logs never carry them."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and isinstance(v, str) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def format_line(rec: dict) -> str:
    """One readable console line for a train, eval or harness record."""
    if rec.get("kind") == HARNESS_KIND:  # megalite/eval_watch.py
        shown = [f"{k.removeprefix('harness/')} {v:.4g}" for k, v in harness_metrics(rec).items()]
        extra = rec.get("harness_error") or rec.get("harness_skipped")
        return f"harness step {rec['step']:>6} | " + " | ".join(shown + ([extra] if extra else []))
    if "val_loss" in rec:
        bpb = f" | val_bpb {rec['val_bpb']:.4f}" if rec.get("val_bpb") is not None else ""
        return (
            f"eval  step {rec['step']:>6} | val_loss {rec['val_loss']:.4f} | "
            f"val_ppl {rec['val_ppl']:.2f}{bpb}"
        )
    return (
        f"train step {rec['step']:>6} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
        f"gnorm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:,.0f} | "
        f"TFLOP/s {rec['tflops_per_device']:.3g} | MFU {100 * rec['mfu']:.2f}% | "
        f"mem {rec['mem_gb']:.2f} GB"
    )


class MetricsLogger:
    """Fans records out to the console, <run_dir>/metrics.jsonl and wandb (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        console: bool,
        jsonl: bool,
        wandb_cfg: Any,
        config: dict,
    ) -> None:
        self.enabled = enabled
        self.console = console and enabled
        self.path = RunDir(run_dir).metrics if (jsonl and enabled) else None
        self.run = None
        if enabled and wandb_cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                tags=list(wandb_cfg.tags),
                dir=str(run_dir),
                config=redact(config),
                resume="allow",
            )

    def info(self, msg: str) -> None:
        if self.console:
            print(msg, file=sys.stdout, flush=True)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self.console:
            self.info(format_line(rec))
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# Records of downstream evals (megalite/eval_watch.py), appended by another process than the
# trainer's: {"step", "kind": "harness", "harness/<task>/<metric>": value, ...}.
HARNESS_KIND = "harness"


def harness_metrics(rec: dict) -> dict[str, float]:
    """The numeric harness/<task>/<metric> values of a record."""
    return {
        k: v
        for k, v in rec.items()
        if k.startswith("harness/") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    # Two processes append (trainer, eval watcher): a last line without its newline is still
    # being written.
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def plot_losses(metrics_path: Path, out: Path, baseline: float | None = None) -> None:
    """Train and val loss against step, from metrics.jsonl, as a PNG; harness evals (but
    perplexities, on another scale) in a panel beside it when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        if r.get("kind") == HARNESS_KIND:
            for k, v in harness_metrics(r).items():
                if "perplexity" not in k:
                    evals.setdefault(k.removeprefix("harness/"), []).append((r["step"], v))
    if evals:
        # The trainer's bits per byte, on the scale of the harness's.
        bpb = [(r["step"], r["val_bpb"]) for r in recs if r.get("val_bpb") is not None]
        if bpb:
            evals["val_bpb (trainer)"] = bpb
        fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(13, 4))
        for name, points in sorted(evals.items()):
            ax_h.plot(*zip(*sorted(points)), "o-", label=name)
        ax_h.set_xlabel("step")
        ax_h.set_title("lm-eval harness")
        ax_h.legend(fontsize="small")
        ax_h.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, ls="--", c="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # The trainer and the eval watcher both draw it: each its own temp file.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
