"""Whether Triton can run here, and the one switch the kernels' wrappers share.

Triton kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (Triton's
numpy interpreter; slow, for tests). The interpreter flag is read when a kernel is *defined*,
so it must be set before any `llava_rt.kernels` module is imported.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path never needs Triton
    triton = None
    tl = None

HAVE_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(*tensors) -> bool:
    """True where the Triton kernels can run on these tensors: CUDA (compiled) or CPU (interpreter)."""
    if not HAVE_TRITON:
        return False
    return all(t.is_cuda for t in tensors) or (INTERPRET and all(t.device.type == "cpu" for t in tensors))


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
