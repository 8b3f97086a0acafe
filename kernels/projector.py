"""The LLaVA projector written straight into the decoder's input-embedding buffer.

    fused_projector(x, w1, b1, w2, b2, act, out, rows) -> out
        x [M, Din] vision features (M = images * image_seq_length); w1 [H, Din], w2 [H, H] in
        nn.Linear layout ([out, in]); b1/b2 [H] or None; w2 None = LLaVA's linear projector.
        act: "gelu" (erf, LLaVA-1.5's projector_hidden_act), "gelu_pytorch_tanh" or "linear".
        out [R, H] is the decoder's input-embedding buffer (token embeddings already in it); row
        m of the projection is stored at out[rows[m]], the image-token rows. Other rows are untouched.

Two launches of one GEMM kernel: GEMM 1 with bias and GELU in its epilogue (fp32 accumulate,
rounded once to the output dtype), then GEMM 2 with bias whose epilogue scatters its rows into
`out`, so there is no separate bias, activation or masked_scatter pass over memory. The hidden
activation [M, H] (576 x 4096 fp16 = 4.7 MB for one LLaVA-1.5 image) makes one round trip through
memory: keeping it on chip would need all of H per row block, too much for shared memory at H = 4096.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, tl, triton

ACTIVATIONS = {"linear": 0, "gelu": 1, "gelu_pytorch_tanh": 2}


def _act_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "linear":
        return x
    raise ValueError(f"activation {act!r} unsupported; choose one of {', '.join(ACTIVATIONS)}")


def fused_projector_ref(x, w1, b1, w2, b2, act, out, rows):
    """Plain torch: fp32 math, each stage rounded to out's dtype like the fused kernel does."""
    h = F.linear(x.float(), w1.float(), None if b1 is None else b1.float())
    if w2 is not None:
        h = _act_ref(h, act).to(out.dtype).float()
        h = F.linear(h, w2.float(), None if b2 is None else b2.float())
    out[rows] = h.to(out.dtype)
    return out


if HAVE_TRITON:

    @triton.jit
    def _linear_kernel(
        X, W, B, Y, ROWS, M, N, K,
        s_xm, s_xk, s_wn, s_wk, s_ym, s_yn,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_ROWS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row tiles share each column strip of W while it is in L2.
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
        pid_n = (pid % (GROUP_M * n_n)) // size_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(X + rm[:, None] * s_xm + kk[None, :] * s_xk, mask=mmask[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(W + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=nmask[None, :] & (kk[:, None] < K), other=0.0)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # exact GELU
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:  # tanh GELU; tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
        if HAS_ROWS:
            out_rows = tl.load(ROWS + rm, mask=mmask, other=0).to(tl.int64)
        else:
            out_rows = rm.to(tl.int64)
        tl.store(Y + out_rows[:, None] * s_ym + rn[None, :] * s_yn, acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def _linear(x, w, b, act: int, y, rows):
    m, k = x.shape
    n = w.shape[0]
    small = m * n <= 4096
    bm, bn, bk = (16, 32, 32) if small else (64, 128, 32) if x.dtype == torch.float32 else (128, 128, 64)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](x, w, w if b is None else b, y, x if rows is None else rows, m, n, k,
                         x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                         HAS_BIAS=b is not None, ACT=act, HAS_ROWS=rows is not None,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                         num_warps=4 if small else 8, num_stages=3)
    return y


def fused_projector(x, w1, b1, w2, b2, act, out, rows):
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} unsupported by the fused projector; choose one of {', '.join(ACTIVATIONS)}")
    if rows.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {rows.shape[0]} image-token rows")
    if x.shape[0] == 0:
        return out
    if w2 is None:
        return _linear(x, w1, b1, 0, out, rows)
    h = torch.empty(x.shape[0], w1.shape[0], dtype=out.dtype, device=x.device)
    _linear(x, w1, b1, ACTIVATIONS[act], h, None)
    return _linear(h, w2, b2, 0, out, rows)
