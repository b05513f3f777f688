"""FLOPs per token, peak FLOP/s by device, MFU, and the metric sinks (console, jsonl, wandb).

FLOP convention (the PaLM paper's, appendix B; also Megatron-LM's and torchtitan's):

    flops_per_token = 6 * N_matmul + 12 * n_layers * dim * seq_len

- N_matmul counts every weight used in a matrix multiply: the attention and MLP projections and
  the output head (tied or not: a tied embedding is still one (V, C) matmul in the head). The
  input embedding is a lookup, not a matmul, and norms are elementwise: both excluded.
- 6 = 2 (multiply + add) x 3 (forward, and backward for activations and for weights).
- The attention term counts QK^T and AV over the full T x T score matrix, forward and backward:
  2 matmuls x 2 FLOPs x T x dim per token per layer x 3. No causal halving: a causal kernel does
  about half that work, so this convention overstates attention FLOPs by up to 2x (it matches the
  numbers published by PaLM, Megatron-LM and torchtitan, which is the point of an MFU).
- Activation recompute is not counted (that would be HFU, hardware FLOPs).

MFU = achieved model FLOP/s per device / peak dense bf16 FLOP/s of that device.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megalite.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all projections plus the output head."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # wq, wo, wk, wv
    mlp = 3 * cfg.dim * cfg.hidden_dim
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) by the convention in the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets. Matched in
# order against the lower-cased device name, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("gh200", 989.4),
    ("h200", 989.4),
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.4),  # SXM5
    ("h800", 989.4),
    ("b200", 2250.0),
    ("gb200", 2500.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.1),
    ("l4", 121.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("mi300x", 1307.4),
    ("mi325x", 1307.4),
    ("mi250x", 383.0),
]


def lookup_peak_tflops(device_name: str) -> float | None:
    """The table's entry for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"(^|[^a-z0-9]){re.escape(key)}([^a-z0-9]|$)", name):
            return tflops
    return None


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8
) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on this device, best of `repeats` runs (a peak:
    the best run is the one least disturbed by other work on the machine)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


@dataclass
class Peak:
    tflops: float
    source: str  # "table", "config" or "measured"
    device_name: str

    @property
    def label(self) -> str:
        return {
            "table": f"vs {self.device_name} datasheet bf16 peak {self.tflops:g} TFLOP/s",
            "config": f"vs configured peak {self.tflops:g} TFLOP/s",
            "measured": f"vs measured {self.device_name} GEMM peak {self.tflops:.3g} TFLOP/s",
        }[self.source]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def resolve_peak(device: torch.device, dtype: torch.dtype, override: float | None) -> Peak:
    """Configured peak, else the table for known GPUs, else a measured matmul peak (CPUs)."""
    name = device_name(device)
    if override is not None:
        return Peak(override, "config", name)
    if device.type == "cuda":
        table = lookup_peak_tflops(name)
        if table is not None:
            return Peak(table, "table", name)
    return Peak(measure_matmul_tflops(device, dtype), "measured", name)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20


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
    """One readable console line for a train or eval record."""
    if "val_loss" in rec:
        return (
            f"eval  step {rec['step']:>6} | val_loss {rec['val_loss']:.4f} | "
            f"val_ppl {rec['val_ppl']:.2f}"
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
        self.path = run_dir / "metrics.jsonl" if (jsonl and enabled) else None
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


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out: Path, baseline: float | None = None) -> None:
    """Train and val loss against step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
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
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
