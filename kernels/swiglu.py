"""SwiGLU's elementwise half: silu(gate) * up from the fused gate/up projection, in one pass.

    silu_mul(gate_up, out=None) -> out
        gate_up [..., 2I] contiguous (the gate in the first half, up in the second, as
        llava_rt.model.fuse_projections lays them out); out [..., I]. Rounded like the unfused
        torch code: silu in fp32 rounded to the dtype, then the product in fp32 rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, tl, triton


def silu_mul_ref(gate_up, out=None):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up if out is None else torch.mul(F.silu(gate), up, out=out)


if HAVE_TRITON:

    @triton.jit
    def _silu_mul_kernel(GU, O, n_cols, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(GU + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
        s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
        tl.store(O + row * n_cols + cols, (s.to(tl.float32) * u.to(tl.float32)).to(O.dtype.element_ty), mask=mask)


def silu_mul(gate_up, out=None):
    if not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be contiguous with an even last dimension")
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n) if out is None else out
    rows = out.numel() // n if n else 0
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
