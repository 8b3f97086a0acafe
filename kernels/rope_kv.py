"""RoPE on q and k fused with the paged KV-cache write: one pass over the new tokens.

    rope_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out=None, k_out=None) -> q_out
        q [N, Hq, D], k/v [N, Hkv, D] (token-major; views of the qkv projection are fine: only the
        last dimension must be contiguous), positions [N], slot_mapping [N] (flat cache slot
        block * block_size + offset; -1 = padding, not stored). Rotated q goes to q_out; rotated k
        and v go to the caches [num_blocks, block_size, Hkv, D]; with k_out ([N, Hkv, D], may be k
        itself) the rotated k of each stored token goes there too, for attention that reads this
        step's keys directly (a whole prompt through SDPA). Nothing else is written.

The rotation is the rotate-half convention of transformers' Llama and `llava_rt.model.apply_rope`:
out = x * cos + cat(-x2, x1) * sin. cos/sin come from `rope_tables`, [max_positions, D/2] fp32
tables built once with the model's own formula, so the kernel does no transcendental math and
agrees with the model bit for bit in fp32 (the rotation itself is done in fp32, then rounded).
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, next_pow2, tl, triton


def rope_tables(max_positions: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim // 2] in fp32, as `llava_rt.model.rope_cos_sin` computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def rope_kv_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out=None, k_out=None):
    def rotate(x):
        c, s = cos[positions][:, None].float(), sin[positions][:, None].float()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    q_out = torch.empty_like(q) if q_out is None else q_out
    q_out.copy_(rotate(q))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    n_kv, d = k_cache.shape[2:]
    k_rot = rotate(k)
    if k_out is not None:
        k_out[keep] = k_rot[keep].to(k_out.dtype)
    k_cache.view(-1, n_kv, d).index_copy_(0, slots, k_rot[keep].to(k_cache.dtype))
    v_cache.view(-1, n_kv, d).index_copy_(0, slots, v[keep].to(v_cache.dtype))
    return q_out


if HAVE_TRITON:

    @triton.jit
    def _rope_kv_kernel(
        Q, K, V, POS, COS, SIN, KC, VC, SLOT, QO, KO,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_qot, s_qoh, s_kcs, s_kch, s_vcs, s_vch, s_cos, s_kot, s_koh,
        HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF: tl.constexpr,
        K_OUT: tl.constexpr,
    ):
        t = tl.program_id(0)
        pos = tl.load(POS + t).to(tl.int64)
        i = tl.arange(0, HALF)
        c = tl.load(COS + pos * s_cos + i)[None, :]
        s = tl.load(SIN + pos * s_cos + i)[None, :]

        hq = tl.arange(0, HQ_PAD)[:, None]
        mq = hq < HQ
        x1 = tl.load(Q + t * s_qt + hq * s_qh + i[None, :], mask=mq, other=0.0).to(tl.float32)
        x2 = tl.load(Q + t * s_qt + hq * s_qh + HALF + i[None, :], mask=mq, other=0.0).to(tl.float32)
        qo = QO + t * s_qot + hq * s_qoh + i[None, :]
        tl.store(qo, (x1 * c - x2 * s).to(QO.dtype.element_ty), mask=mq)
        tl.store(qo + HALF, (x2 * c + x1 * s).to(QO.dtype.element_ty), mask=mq)

        slot = tl.load(SLOT + t).to(tl.int64)
        hk = tl.arange(0, HKV_PAD)[:, None]
        # The skip test as a [1, HALF] tensor: the interpreter rejects a scalar bool in a mask.
        mk = (hk < HKV) & (tl.zeros([1, HALF], tl.int64) + slot >= 0)
        x1 = tl.load(K + t * s_kt + hk * s_kh + i[None, :], mask=mk, other=0.0).to(tl.float32)
        x2 = tl.load(K + t * s_kt + hk * s_kh + HALF + i[None, :], mask=mk, other=0.0).to(tl.float32)
        kc = KC + slot * s_kcs + hk * s_kch + i[None, :]
        tl.store(kc, (x1 * c - x2 * s).to(KC.dtype.element_ty), mask=mk)
        tl.store(kc + HALF, (x2 * c + x1 * s).to(KC.dtype.element_ty), mask=mk)
        if K_OUT:
            ko = KO + t * s_kot + hk * s_koh + i[None, :]
            tl.store(ko, (x1 * c - x2 * s).to(KO.dtype.element_ty), mask=mk)
            tl.store(ko + HALF, (x2 * c + x1 * s).to(KO.dtype.element_ty), mask=mk)
        v1 = tl.load(V + t * s_vt + hk * s_vh + i[None, :], mask=mk, other=0.0)
        v2 = tl.load(V + t * s_vt + hk * s_vh + HALF + i[None, :], mask=mk, other=0.0)
        vo = VC + slot * s_vcs + hk * s_vch + i[None, :]
        tl.store(vo, v1.to(VC.dtype.element_ty), mask=mk)
        tl.store(vo + HALF, v2.to(VC.dtype.element_ty), mask=mk)


def rope_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out=None, k_out=None):
    n, hq, d = q.shape
    n_kv = k.shape[1]
    if k_cache.shape[2:] != (n_kv, d) or v_cache.shape != k_cache.shape or d % 2 or next_pow2(d // 2) != d // 2:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, k_cache {tuple(k_cache.shape)}")
    if k_out is not None and k_out.shape != k.shape:
        raise ValueError(f"k_out {tuple(k_out.shape)} must have k's shape {tuple(k.shape)}")
    for t in (q, k, v, k_cache, v_cache, cos, sin) + (() if k_out is None else (k_out,)):
        if t.stride(-1) != 1:
            raise ValueError("the last dimension of every tensor must be contiguous")
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1) or v_cache.stride(0) != v_cache.shape[1] * v_cache.stride(1):
        raise ValueError("cache blocks must be contiguous (flat slots index block * block_size + offset)")
    q_out = torch.empty_like(q) if q_out is None else q_out
    if n == 0:
        return q_out
    ko = q_out if k_out is None else k_out  # any tensor when unused
    _rope_kv_kernel[(n,)](q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out, ko,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          q_out.stride(0), q_out.stride(1), k_cache.stride(1), k_cache.stride(2),
                          v_cache.stride(1), v_cache.stride(2), cos.stride(0), ko.stride(0), ko.stride(1),
                          HQ=hq, HKV=n_kv, HQ_PAD=next_pow2(hq), HKV_PAD=next_pow2(n_kv), HALF=d // 2,
                          K_OUT=k_out is not None)
    return q_out
