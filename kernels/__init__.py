"""megalite.kernels: fused Triton kernels and their pure-PyTorch references.

Importing this package never imports Triton; each op's module does, so import the op from its
module once a Triton backend is selected (and, on CPU, after ``TRITON_INTERPRET=1`` is set):

    from megalite.kernels.rms_norm import rms_norm
    from megalite.kernels.cross_entropy import cross_entropy
    from megalite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from megalite.kernels.flash_attention import flash_attention
    from megalite.kernels import reference      # pure-PyTorch versions (the model's CPU path)

The functions are deliberately not re-exported here: a package attribute named like a submodule
is replaced by that submodule as soon as anything imports it, so ``megalite.kernels.rms_norm``
would be the function or the module depending on import order.
"""

from megalite.kernels import reference

__all__ = ["reference"]
