"""The compute backends: one table per choice (`model.attention`, `model.norm`, `train.loss`),
each with its `auto` rule, and the activation-checkpointing modes.

The config checks its choices against these tables (and which backends take tensor-parallel
inputs), the model resolves `auto` with `Choice.resolve`, and the benchmark runner skips the
backends that need a CUDA GPU. A new backend is a new row here plus its function in the model.

Pure data: importing this module imports nothing from torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_TRITON_ON_CPU = (
    "is a Triton kernel and needs a CUDA GPU (on a CPU Triton runs only in its interpreter, "
    "which checks numerics, not speed)"
)


@dataclass(frozen=True)
class Backend:
    name: str
    # None: runs on a CPU; else why it needs a CUDA GPU, completing "<key>=<name> ...".
    needs_cuda: str | None = None
    # Takes the inputs tensor parallelism hands it (sequence-sharded activations, vocab-sharded
    # logits); False: the config refuses it with parallel.tp > 1.
    tensor_parallel: bool = True
    description: str = ""


@dataclass(frozen=True)
class Choice:
    key: str  # the config key
    backends: dict[str, Backend]
    # (device type, tp degree) -> the backend `auto` means there.
    auto: Callable[[str, int], str]

    @property
    def choices(self) -> tuple[str, ...]:
        return ("auto", *self.backends)

    def resolve(self, value: str, device_type: str, tp: int = 1) -> str:
        return self.auto(device_type, tp) if value == "auto" else value

    def supports_tp(self, value: str) -> bool:
        """Whether `value` takes tensor-parallel inputs (`auto` picks one that does)."""
        return value == "auto" or self.backends[value].tensor_parallel


def _table(*backends: Backend) -> dict[str, Backend]:
    return {b.name: b for b in backends}


# torch SDPA everywhere (on CUDA it dispatches to the flash, cuDNN or efficient kernels);
# megalite's Triton kernel and flash-attn are opt-in until `megalite-gpu-check` shows them faster.
ATTENTION = Choice(
    "model.attention",
    _table(
        Backend("sdpa", description="torch scaled_dot_product_attention"),
        Backend("triton", _TRITON_ON_CPU, description="megalite's Triton flash attention"),
        Backend(
            "flash_attn",
            "needs a CUDA GPU (flash-attn has no CPU build)",
            description="the flash-attn package",
        ),
    ),
    auto=lambda device_type, tp: "sdpa",
)

# torch everywhere: torch.compile fuses it, and the Triton kernel is opt-in.
NORM = Choice(
    "model.norm",
    _table(
        Backend("torch", description="the reference RMSNorm (kernels/reference.py)"),
        Backend(
            "triton",
            _TRITON_ON_CPU,
            tensor_parallel=False,
            description="megalite's Triton RMSNorm (no sequence-sharded inputs)",
        ),
    ),
    auto=lambda device_type, tp: "torch",
)

# The fused linear + cross-entropy kernel on CUDA without tensor parallelism (it never
# materializes the N x V logits: 2 GiB in bf16 at 8K tokens x 128K vocab, plus their fp32 softmax
# and gradient); torch otherwise (on CPU, and under tensor parallelism, where the logits are
# vocab-sharded and the loss runs in `loss_parallel`).
LOSS = Choice(
    "train.loss",
    _table(
        Backend("torch", description="cross-entropy over the logits (loss parallel under TP)"),
        Backend(
            "triton",
            _TRITON_ON_CPU,
            tensor_parallel=False,
            description="megalite's Triton cross-entropy over the logits",
        ),
        Backend(
            "fused_linear",
            _TRITON_ON_CPU,
            tensor_parallel=False,
            description="megalite's fused output layer + cross-entropy: no N x V logits",
        ),
    ),
    auto=lambda device_type, tp: "fused_linear" if device_type == "cuda" and tp == 1 else "torch",
)


def needing_cuda(
    attention: str, norm: str, loss: str, device_type: str
) -> list[tuple[Choice, str, str]]:
    """(choice, value, why) for each chosen backend that needs a CUDA GPU this device is not."""
    if device_type == "cuda":
        return []
    out = []
    for choice, value in ((ATTENTION, attention), (NORM, norm), (LOSS, loss)):
        backend = choice.backends.get(choice.resolve(value, device_type))
        if backend is not None and backend.needs_cuda:
            out.append((choice, value, backend.needs_cuda))
    return out


# parallel.activation_checkpointing, per transformer block (parallel/checkpointing.py): none;
# selective keeps the matmul, attention and reduce-scatter outputs and recomputes the cheap
# elementwise ops; full recomputes the whole block in backward.
AC_MODES = ("none", "selective", "full")
