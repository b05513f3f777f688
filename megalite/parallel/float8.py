"""Float8 training with torchao (`train.float8=tensorwise|rowwise`).

`convert` swaps the transformer blocks' `nn.Linear` layers for torchao's `Float8Linear` on the
meta device, before tensor parallelism, activation checkpointing, torch.compile and FSDP2 are
applied (torchtitan's order: the model converters run first, so every wrapper sees the float8
modules). The output head is never converted (its error goes straight into the logits, and its
vocab dimension is rarely a multiple of 16); the embedding is not a Linear. The first and the
last block can be kept in bf16 (`train.float8_first_block` / `float8_last_block`), where
activations and gradients have the widest range.

Recipes (torchao's):
- tensorwise: one scale per tensor; with FSDP2 the weights are all-gathered in float8
  (`enable_fsdp_float8_all_gather`), half the bytes of bf16, and the scales of all weights
  are computed with one all-reduce after each optimizer step
  (`precompute_float8_dynamic_scale_for_fsdp`).
- rowwise: one scale per row (power-of-two scales); more accurate, slower kernels, weights
  all-gathered in bf16.

On a CPU `torch._scaled_mm` exists but is a scalar loop (~60 MFLOP/s here, 700x slower than an
fp32 matmul), so CPU runs use torchao's `emulate=True`: the same float8 quantization of inputs,
weights and gradients, the product of the dequantized values computed in fp32 — what
`_scaled_mm` computes up to the order of the fp32 accumulation (tests/test_float8.py checks
both). GPU runs use the real float8 GEMMs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megalite.devices import lookup_peak_tflops

if TYPE_CHECKING:
    from megalite.config import Config


# The inner and outer dims of a float8 GEMM must be multiples of 16 (cuBLAS / CUTLASS rule).
_ALIGN = 16


def recipe_config(recipe: str, *, emulate: bool, fsdp: bool):
    """torchao's Float8LinearConfig for a recipe; float8 all-gather with FSDP2 for tensorwise
    (rowwise weights are all-gathered in high precision: torchao has no rowwise all-gather)."""
    from torchao.float8 import Float8LinearConfig

    base = Float8LinearConfig.from_recipe_name(recipe)
    return Float8LinearConfig(
        cast_config_input=base.cast_config_input,
        cast_config_weight=base.cast_config_weight,
        cast_config_grad_output=base.cast_config_grad_output,
        round_scales_to_power_of_2=base.round_scales_to_power_of_2,
        enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise",
        emulate=emulate,
    )


def converted_blocks(n_layers: int, first: bool, last: bool) -> list[int]:
    """The indices of the blocks whose Linear layers run in float8."""
    skip = set()
    if not first:
        skip.add(0)
    if not last:
        skip.add(n_layers - 1)
    return [i for i in range(n_layers) if i not in skip]


def convert(model: nn.Module, cfg: Config, *, device_type: str, fsdp: bool) -> list[str]:
    """Swaps the chosen blocks' Linear layers for Float8Linear in place (on any device, meta
    included); returns the names of the converted modules. A no-op for train.float8=none."""
    tcfg = cfg.train
    if tcfg.float8 == "none":
        return []
    from torchao.float8 import convert_to_float8_training

    config = recipe_config(tcfg.float8, emulate=device_type == "cpu", fsdp=fsdp)
    blocks = {
        str(i)
        for i in converted_blocks(
            cfg.model.n_layers, tcfg.float8_first_block, tcfg.float8_last_block
        )
    }
    converted: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        # Only Linear layers inside the chosen blocks ("layers.<i>.<...>"): never the head.
        parts = fqn.split(".")
        ok = (
            isinstance(module, nn.Linear)
            and len(parts) > 2
            and parts[0] == "layers"
            and parts[1] in blocks
        )
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return converted


def install_scale_precompute(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, fsdp: bool
) -> None:
    """Tensorwise + FSDP2: after each optimizer step, compute every float8 weight's scale with
    one all-reduce for the whole model, instead of one per weight at its all-gather."""
    if not (fsdp and cfg.train.float8 == "tensorwise"):
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))


# ------------------------------------------------------------------------------- checks
def fp8_tensor_cores(capability: tuple[int, int], hip_arch: str | None) -> bool:
    """Whether a GPU multiplies float8 in hardware: NVIDIA Ada / Hopper and later (compute
    capability >= 8.9), AMD CDNA3 and later (MI300: gfx942, MI350: gfx950)."""
    if hip_arch is not None:
        return any(hip_arch.startswith(a) for a in ("gfx942", "gfx950"))
    return capability >= (8, 9)


def float8_problems(cfg: Config, device_type: str, tp: int, deepspeed: bool) -> list[str]:
    """Everything that stops `train.float8` from running, each with its fix (preflight)."""
    recipe = cfg.train.float8
    if recipe == "none":
        return []
    problems = []
    if deepspeed:
        problems.append(
            f"train.float8={recipe} is applied by the native engine, not by DeepSpeed "
            f"(parallel.strategy={cfg.parallel.strategy}); use parallel.strategy=fsdp (ZeRO-3's "
            "equivalent) or train.float8=none"
        )
    m = cfg.model
    for key, value in (
        ("model.dim", m.dim),
        ("model.n_kv_heads x head_dim", m.kv_heads * m.head_dim),
        ("model.ffn_dim", m.hidden_dim),
    ):
        if value % (_ALIGN * tp):
            what = f"{_ALIGN} x parallel.tp = {_ALIGN * tp}" if tp > 1 else str(_ALIGN)
            problems.append(
                f"train.float8={recipe} needs the Linear dims to be multiples of {what} "
                f"(float8 GEMMs), but {key}={value}; pick a model whose dims are, or "
                "train.float8=none"
            )
    if not converted_blocks(m.n_layers, cfg.train.float8_first_block, cfg.train.float8_last_block):
        problems.append(
            f"train.float8={recipe} converts no block: model.n_layers={m.n_layers} and both "
            "train.float8_first_block and train.float8_last_block are false; set one to true"
        )
    if device_type == "cuda":
        hip = torch.cuda.get_device_properties(0).gcnArchName if torch.version.hip else None
        gpu = (torch.cuda.get_device_name(), torch.cuda.get_device_capability(), hip)
        problems += gpu_problems(recipe, *gpu)
    return problems


def gpu_problems(
    recipe: str, name: str, capability: tuple[int, int], hip_arch: str | None
) -> list[str]:
    """The GPU check of `float8_problems`, from the facts torch.cuda reports."""
    if fp8_tensor_cores(capability, hip_arch):
        return []
    arch = hip_arch or f"compute capability {capability[0]}.{capability[1]}"
    return [
        f"train.float8={recipe}: {name} ({arch}) has no float8 tensor cores (they start with "
        "NVIDIA Ada / Hopper, capability 8.9, and AMD MI300); use train.float8=none, or a GPU "
        "that has them"
    ]


def summary(model: nn.Module, cfg: Config, device_type: str, device_name: str) -> str:
    """One start-up line: what runs in float8, how, and which peak MFU is measured against."""
    from torchao.float8.float8_linear import Float8Linear

    n = sum(isinstance(m, Float8Linear) for m in model.modules())
    how = "emulated: float8 quantization, fp32 GEMMs" if device_type == "cpu" else "float8 GEMMs"
    fp8_peak = lookup_peak_tflops(device_name, "fp8") if device_type == "cuda" else None
    peak = f"; its fp8 peak is {fp8_peak:g} TFLOP/s" if fp8_peak else ""
    return (
        f"float8 {cfg.train.float8}: {n} Linear layers of the blocks ({how}); the output head "
        f"and the rest in {cfg.train.precision}. MFU stays against the bf16 peak{peak}"
    )
