"""AdamW with per-group weight decay, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from megalite.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: matrices with `optim.weight_decay`, and the rest (norm weights always; the
    embedding and a tied output unless decay_norms / decay_embeddings say otherwise) with none."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # checkpoint_wrapper and compile insert prefixes; match on the leaf names.
        # A ZeRO-3 parameter is an empty placeholder; its shape lives in `ds_shape`.
        ndim = len(getattr(p, "ds_shape", p.shape))
        is_norm = ndim < 2 or name.endswith("norm.weight")
        is_embedding = "tok_embeddings" in name
        if (is_norm and not cfg.decay_norms) or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw_implementation(device_type: str) -> dict[str, bool]:
    """AdamW's implementation switch for parameters on `device_type`: `fused` on CUDA (one
    kernel launch per step for all parameters, DTensor shards included), `foreach` elsewhere
    (the multi-tensor path; torch's default on CPU is a loop over parameters)."""
    return {"fused": True} if device_type == "cuda" else {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, its implementation picked from where the parameters live
    (build it after the model is materialized: a DTensor parameter reports its local device)."""
    groups = param_groups(model, cfg)
    devices = {p.device.type for group in groups for p in group["params"]}
    device_type = devices.pop() if len(devices) == 1 else "mixed"
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        **adamw_implementation(device_type),
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    - warmup: linear from lr/warmup_steps up to lr over the first `warmup_steps` steps;
    - cosine: then cosine decay to lr * min_lr_ratio at the last step;
    - wsd (warmup-stable-decay): constant lr, then a linear decay to lr * min_lr_ratio over the
      final `decay_fraction` of the run;
    - constant: lr after warmup.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = round(cfg.decay_fraction * max_steps)
    decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
    if step < decay_start or decay_steps == 0:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    return peak + (floor - peak) * progress
