"""megalite.kernels: fused Triton kernels and their pure-PyTorch references.

Importing this package never imports Triton: the Triton ops live in one module per op and are
imported lazily by the model when a Triton backend is selected, so a CPU box without a GPU (or a
test that must set ``TRITON_INTERPRET=1`` first) can import everything else.
"""

from megalite.kernels import reference

__all__ = ["reference"]
