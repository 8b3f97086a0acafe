"""Attention over the paged KV cache: decode (one query per sequence, split-K) and chunked prefill.

The cache is the engine's: [num_blocks, block_size, kv_heads, head_dim] per layer; sequence b's
token at position p lives in block block_tables[b, p // block_size] at offset p % block_size.
Keys are gathered through the block table inside the kernels (never materialised per sequence,
which is what the torch reference and `LlamaAttention._paged` do).

    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, num_splits=None)
        q [B, Hq, D]: one new query per sequence, already rotated; its key is already in the cache.
        Flash-decoding: the context is cut into `num_splits` ranges, each program reduces its
        range to (partial output, log-sum-exp), and a second kernel combines them, so a batch of
        1 with a 4k context still fills the GPU. num_splits depends only on shapes (never on the
        values of context_lens), so the launch is CUDA-graph safe.

    paged_prefill_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale, out=None, max_q_len=None)
        q [N, Hq, D]: the new queries of all sequences, sequence b's at rows q_start[b] ..
        q_start[b] + q_lens[b] (packed with q_start = cu_seqlens[:-1], or padded with
        q_start = b * T). Their keys are already in the cache; query i of sequence b sits at
        position context_lens[b] - q_lens[b] + i and attends causally to every cached key up to
        it, so a long prompt can be prefilled in chunks. Rows outside any sequence are not written.

GQA: query head h reads kv head h // (Hq // Hkv). The decode kernel handles a whole group of
query heads per program (one pass over the group's keys); softmax runs in fp32 with exp2.
"""

from __future__ import annotations

import math

import torch

from ._triton import HAVE_TRITON, next_pow2, tl, triton

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- references


def _gather(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence: [n, kv_heads, D]."""
    return cache[table].reshape(-1, *cache.shape[2:])[:n]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [S, Hkv, D], mask [T, S] -> [T, Hq, D] in fp32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, num_splits=None):
    """Plain torch, one sequence at a time, fp32 softmax. num_splits is accepted and ignored."""
    out = torch.empty_like(q) if out is None else out
    for b, n in enumerate(context_lens.tolist()):
        k, v = _gather(k_cache, block_tables[b], n), _gather(v_cache, block_tables[b], n)
        mask = torch.ones(1, n, dtype=torch.bool, device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, mask, scale)[0].to(out.dtype)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale, out=None,
                                max_q_len=None):
    """Plain torch, one sequence at a time, fp32 softmax. max_q_len is accepted and ignored."""
    out = torch.empty_like(q) if out is None else out
    for b, (s, t, n) in enumerate(zip(q_start.tolist(), q_lens.tolist(), context_lens.tolist())):
        if t == 0:
            continue
        k, v = _gather(k_cache, block_tables[b], n), _gather(v_cache, block_tables[b], n)
        q_pos = torch.arange(n - t, n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        out[s : s + t] = _attend(q[s : s + t], k, v, mask, scale).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- Triton

if HAVE_TRITON:

    @triton.jit
    def _online_softmax_tile(q, m, l, acc, K, V, BT, b, kvh, n, nmask, visible,
                             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, scale_log2, page_size, D: tl.constexpr):
        """One tile of keys n (gathered through the block table) folded into the running (m, l, acc)."""
        d = tl.arange(0, D)
        page = tl.load(BT + b * s_btb + n // page_size, mask=nmask, other=0).to(tl.int64)
        off = n % page_size
        k = tl.load(K + page[:, None] * s_kb + off[:, None] * s_ks + kvh * s_kh + d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * s_vb + off[:, None] * s_vs + kvh * s_vh + d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return m_new, l, acc

    @triton.jit
    def _decode_kernel(
        Q, K, V, BT, CTX, O, OP, LSEP,
        s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, s_ob, s_oh, s_pb, s_ph, s_ps,
        scale_log2, page_size, split_len,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(CTX + b).to(tl.int32)
        start = split * split_len
        end = tl.minimum(ctx, start + split_len)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            m, l, acc = _online_softmax_tile(q, m, l, acc, K, V, BT, b, kvh, n, nmask, nmask[None, :],
                                             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, scale_log2, page_size, D)
        if SPLIT:
            # A range past this sequence's end writes nothing: the combine reads only the ranges
            # that hold keys, so a launch sized for the model's whole context costs little more
            # on a short one.
            live = gmask & (start + g * 0 < ctx)  # a block (the interpreter rejects block & scalar masks)
            lse = m + tl.log2(tl.where(l > 0, l, 1.0))
            base = b * s_pb + heads * s_ph + split * s_ps
            tl.store(OP + base[:, None] + d[None, :], acc / tl.where(l > 0, l, 1.0)[:, None], mask=live[:, None])
            tl.store(LSEP + (b * s_pb + heads * s_ph) // D + split, lse, mask=live)
        else:
            tl.store(O + b * s_ob + heads[:, None] * s_oh + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
                     mask=gmask[:, None])

    @triton.jit
    def _combine_kernel(OP, LSEP, CTX, O, s_pb, s_ph, s_ps, s_ob, s_oh, num_splits, split_len,
                        D: tl.constexpr, SPLITS_PAD: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        ctx = tl.load(CTX + b).to(tl.int32)
        smask = (sp < num_splits) & (sp * split_len < ctx)
        lse = tl.load(LSEP + (b * s_pb + h * s_ph) // D + sp, mask=smask, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))
        w = tl.where(smask, w, 0.0)
        part = tl.load(OP + b * s_pb + h * s_ph + sp[:, None] * s_ps + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + b * s_ob + h * s_oh + d, out.to(O.dtype.element_ty))

    @triton.jit
    def _prefill_kernel(
        Q, K, V, BT, QSTART, QLEN, CTX, O,
        s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, s_ot, s_oh,
        scale_log2, page_size,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        mblk, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kvh = h // GROUP
        q0 = tl.load(QSTART + b).to(tl.int32)
        qlen = tl.load(QLEN + b).to(tl.int32)
        ctx = tl.load(CTX + b).to(tl.int32)
        i = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = i < qlen
        pos = ctx - qlen + i
        d = tl.arange(0, D)
        rows = (q0 + i).to(tl.int64)
        q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + d[None, :], mask=rmask[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Causal: nothing past the tile's last query position is read. A tile past q_len runs
        # no iterations (end <= 0 only when qlen == 0; otherwise its rows are masked on store).
        end = tl.minimum(ctx, ctx - qlen + (mblk + 1) * BLOCK_M)
        end = tl.where(mblk * BLOCK_M < qlen, end, 0)
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            visible = nmask[None, :] & (n[None, :] <= pos[:, None])
            m, l, acc = _online_softmax_tile(q, m, l, acc, K, V, BT, b, kvh, n, nmask, visible,
                                             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, scale_log2, page_size, D)
        l = tl.where(l > 0, l, 1.0)
        tl.store(O + rows[:, None] * s_ot + h * s_oh + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
                 mask=rmask[:, None])


def _check_cache(q, k_cache, v_cache):
    nb, bs, n_kv, d = k_cache.shape
    if v_cache.shape != k_cache.shape or q.shape[-1] != d or q.shape[-2] % n_kv:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {d} unsupported by the Triton attention kernels (16..256, a power of 2)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the last dimension of q and of the caches must be contiguous")
    return bs, n_kv, d


def default_num_splits(batch: int, kv_heads: int, max_context: int, block_n: int = 64, max_splits: int = 128) -> int:
    """Flash-decoding splits from shapes alone (CUDA-graph safe): ranges of about
    4 * batch * kv_heads keys (a multiple of the key tile, at least two tiles), at most max_splits
    of them. Ranges past a sequence's end exit at once and the combine skips them, so the decode
    graphs, sized for the model's whole context, do not pay for it on short sequences. On an H200
    (LLaVA-1.5-7B, 32 heads, context 700 in a 4096-wide table) this picks the fastest of the
    settings benchmarks/sweep_decode.py tried: 32 ranges of 128 keys at batch 1 (11.3 us; 64 ranges:
    13.7), one range at batch 32 (94 us; 2 ranges: 103)."""
    split_len = max(2 * block_n, (4 * batch * kv_heads) // block_n * block_n)
    return max(1, min(max_splits, -(-max_context // split_len)))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, num_splits=None,
                           block_n=None, num_warps=None, num_stages=None):
    """block_n (keys per tile), num_warps, num_stages: launch settings; None = the defaults below
    (benchmarks/sweep_decode.py measures the alternatives)."""
    page, n_kv, d = _check_cache(q, k_cache, v_cache)
    b, hq, _ = q.shape
    out = torch.empty_like(q) if out is None else out
    max_context = block_tables.shape[1] * page
    block_n = block_n or (16 if max_context <= 16 else 64)
    # Two stages, not Triton's three, at head_dim 128: 94 vs 106 us at batch 32 on an H200
    # (benchmarks/results/sweep-decode-h200-2026-11-30-first.json); 4 warps were never slower than 8.
    num_stages = num_stages or (2 if d > 64 else None)
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
    splits = num_splits or default_num_splits(b, n_kv, max_context, block_n)
    split_len = -(-(-(-max_context // splits)) // block_n) * block_n
    splits = -(-max_context // split_len)
    group = hq // n_kv
    common = dict(GROUP=group, GROUP_PAD=max(16, next_pow2(group)), D=d, BLOCK_N=block_n)
    strides = (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0))
    if splits == 1:
        _decode_kernel[(b, n_kv, 1)](q, k_cache, v_cache, block_tables, context_lens, out, out, out,
                                     *strides, *out.stride()[:2], 0, 0, 0, scale * LOG2E, page, split_len,
                                     SPLIT=False, **common, **launch)
        return out
    part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)  # indexed as part's offset // D
    _decode_kernel[(b, n_kv, splits)](q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
                                      *strides, *out.stride()[:2], *part.stride()[:3], scale * LOG2E, page,
                                      split_len, SPLIT=True, **common, **launch)
    _combine_kernel[(b, hq)](part, lse, context_lens, out, *part.stride()[:3], *out.stride()[:2], splits, split_len,
                             D=d, SPLITS_PAD=next_pow2(splits))
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale, out=None,
                            max_q_len=None):
    page, n_kv, d = _check_cache(q, k_cache, v_cache)
    n, hq, _ = q.shape
    out = torch.empty_like(q) if out is None else out
    # max_q_len bounds the grid; without it we read it from q_lens (a host sync, fine outside graphs).
    max_q_len = int(q_lens.max()) if max_q_len is None else max_q_len
    block_m = 16 if max_q_len <= 16 else 64
    block_n = 32 if d > 64 else 64
    grid = (triton.cdiv(max(1, max_q_len), block_m), q_start.shape[0], hq)
    _prefill_kernel[grid](q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, out,
                          *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
                          *out.stride()[:2], scale * LOG2E, page,
                          GROUP=hq // n_kv, D=d, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
