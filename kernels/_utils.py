"""Shared host-side helpers for the Triton ops: input validation, interpreter detection, configs.

Only the per-op modules import this file, and they import Triton; ``megalite.kernels`` itself does
not, so a CPU box can import the package without Triton being usable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton

# Captured once, when the per-op modules decorate their kernels: ``triton.jit`` returns an
# ``InterpretedFunction`` or a ``JITFunction`` depending on TRITON_INTERPRET *at decoration time*,
# so that moment, not the current environment, decides how the kernels launch.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)


def autotune_configs(
    gpu_configs: Sequence[triton.Config], interpreter_config: triton.Config
) -> list[triton.Config]:
    """The GPU autotune list, or one config under the interpreter.

    The interpreter autotunes by running every config, which multiplies CPU test time for no
    information; the kernel logic is block-size generic, and every GPU config is compiled ahead of
    time by ``tests/kernels/test_aot_compile.py``.
    """
    return [interpreter_config] if INTERPRET else list(gpu_configs)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: int | tuple[int, ...] | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Validate one kernel argument; errors name the op, the argument and the value received."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name}.dtype={t.dtype} is not supported; use one of {allowed}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed_ndim:
            raise ValueError(
                f"{op}: {name} must have {' or '.join(map(str, allowed_ndim))} dims, "
                f"got shape {tuple(t.shape)}"
            )
    check_device(op, name, t)
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} with strides "
            f"{t.stride()}; call .contiguous() first"
        )
    return t


def check_device(op: str, name: str, t: torch.Tensor) -> None:
    """Triton needs CUDA tensors, except in the interpreter, which runs on CPU tensors."""
    if INTERPRET:
        if t.device.type != "cpu":
            raise ValueError(
                f"{op}: {name} is on {t.device}, but TRITON_INTERPRET=1 runs kernels on CPU tensors"
            )
    elif t.device.type != "cuda":
        raise ValueError(
            f"{op}: {name} is on {t.device}; the Triton kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing triton to run them on CPU, or use "
            "megalite.kernels.reference)"
        )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listing}")


def check_reduction(op: str, reduction: object) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"{op}: reduction={reduction!r} is not supported; use 'mean', 'sum' or 'none'"
        )
    return reduction  # type: ignore[return-value]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs its lower-precision ops in on ``device``'s type, or None when
    autocast is off there.

    Asked per device type, not through ``torch.amp.custom_fwd``: that decorator fixes one device
    type, while these kernels run on CUDA and, in the interpreter, on CPU.
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_for_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs of an op autocast would run in lower precision (a matmul), cast as autocast
    casts them: floating tensors to the autocast dtype when autocast is on for their device.
    The cast is an ordinary autograd op, so gradients come back in the caller's dtypes."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def autocast_off(device: torch.device) -> torch.autocast:
    """Context for an op's host code: its matmuls and buffers keep the dtypes the op chose,
    whatever autocast state the caller (forward, backward, a compiled graph) runs under."""
    return torch.autocast(device.type, enabled=False)


def num_programs_cap() -> int:
    """How many persistent programs a row-reduction backward should launch (one wave)."""
    if INTERPRET:
        # Few programs keeps interpreter overhead low while still exercising multi-row loops.
        return 4
    return _sm_count(torch.cuda.current_device())


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
