"""Each Triton kernel against its plain-torch reference, and the references against the model.

Where CUDA is available the kernels are compiled and run on the GPU (the GPU suite); elsewhere
they run on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set by kernels_setup.py before any kernel
module is imported; the interpreter is slow, so shapes are small but still cover lengths that
are not multiples of the block size, contexts spanning many blocks, GQA ratios 1, 4 and 8,
batch 1 and several). Every output is poisoned with NaN before the kernel runs, so a row the
kernel forgets to write fails the test.

Tolerances by dtype (max abs error <= atol + rtol * |reference|):
  fp32: rtol 1e-5, atol 1e-5 (dots run with input_precision="ieee": no TF32);
  fp16: rtol 1e-2, atol 1e-2; bf16: rtol 2e-2, atol 2e-2 (8 bits of mantissa). The kernels keep
  softmax and accumulators in fp32 and round once; the references compute in fp32 too.
"""

import pytest
import torch
from kernels_setup import CUDA, DEVICE, require_triton

require_triton()

from llava_rt.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from llava_rt.kernels.projector import fused_projector, fused_projector_ref  # noqa: E402
from llava_rt.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref  # noqa: E402
from llava_rt.kernels.rope_kv import rope_kv_write, rope_kv_write_ref, rope_tables  # noqa: E402
from llava_rt.kernels.swiglu import silu_mul, silu_mul_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# bf16 in the interpreter goes through numpy emulation; it is covered on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def assert_close(got, want, dtype):
    tol = TOL[dtype]
    assert not torch.isnan(got).any(), "the kernel left NaN (an unwritten output)"
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def make_cache(batch, kv_heads, head_dim, block_size, lens, dtype, gen, spare_blocks=3):
    """Random caches whose blocks are handed out shuffled, like a long-running allocator's."""
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + spare_blocks
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    return k, v, tables.to(DEVICE), torch.tensor(lens, device=DEVICE)


# (batch, q heads, kv heads, head_dim, block_size, context lengths, num_splits: None = the default)
DECODE_CASES = [
    (1, 4, 4, 64, 16, [37], None),  # MHA, batch 1, length not a multiple of the block
    (3, 8, 2, 128, 8, [5, 100, 301], None),  # GQA 4, head_dim 128, small blocks
    (2, 8, 1, 64, 16, [1000, 17], 4),  # GQA 8 (MQA-like), 63 blocks, split-K with an empty split
    (4, 16, 2, 128, 32, [1, 33, 64, 500], 3),  # GQA 8, a 1-token context
    (2, 4, 4, 64, 16, [700, 129], 1),  # long context without splitting
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"b{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-s{c[6]}")
def test_paged_decode_attention(case, dtype):
    b, hq, hkv, d, bs, lens, splits = case
    gen = torch.Generator().manual_seed(b * 100 + d)
    k, v, tables, ctx = make_cache(b, hkv, d, bs, lens, dtype, gen)
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE, dtype)
    want = paged_decode_attention_ref(q, k, v, tables, ctx, d**-0.5)
    got = paged_decode_attention(q, k, v, tables, ctx, d**-0.5, out=torch.full_like(q, float("nan")), num_splits=splits)
    assert_close(got, want, dtype)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_decode_attention_table_wider_than_the_contexts(dtype):
    """The decode graphs' layout: block tables as wide as the model's context (here 64 blocks of
    16), contexts far shorter, default splits. Most ranges hold no keys; they must not count."""
    gen = torch.Generator().manual_seed(7)
    k, v, tables, ctx = make_cache(3, 2, 64, 16, [40, 1, 170], dtype, gen, spare_blocks=64)
    wide = torch.randint(0, k.shape[0], (3, 64), generator=gen).to(DEVICE)
    wide[:, : tables.shape[1]] = tables
    q = torch.randn(3, 8, 64, generator=gen).to(DEVICE, dtype)
    want = paged_decode_attention_ref(q, k, v, tables, ctx, 0.125)
    got = paged_decode_attention(q, k, v, wide, ctx, 0.125, out=torch.full_like(q, float("nan")))
    assert_close(got, want, dtype)

# (q heads, kv heads, head_dim, block_size, new queries per sequence, context lengths after them)
PREFILL_CASES = [
    (4, 4, 64, 16, [37], [37]),  # a whole prompt, batch 1
    (8, 2, 128, 8, [5, 20, 1], [5, 100, 300]),  # chunks continuing cached prefixes, GQA 4
    (8, 1, 64, 16, [70, 3], [70, 203]),  # GQA 8; 70 queries span two query tiles
]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"h{c[0]}-kv{c[1]}-d{c[2]}-bs{c[3]}-q{len(c[4])}")
def test_paged_prefill_attention(case, dtype, layout):
    hq, hkv, d, bs, q_lens, lens = case
    b = len(lens)
    gen = torch.Generator().manual_seed(len(q_lens) * 10 + d)
    k, v, tables, ctx = make_cache(b, hkv, d, bs, lens, dtype, gen)
    if layout == "packed":
        starts = [sum(q_lens[:i]) for i in range(b)]
        n = sum(q_lens)
    else:  # the engine's [B, T] batch with padding rows after each sequence's tokens
        t = max(q_lens)
        starts, n = [i * t for i in range(b)], b * t
    q = torch.randn(n, hq, d, generator=gen).to(DEVICE, dtype)
    q_start, q_len = torch.tensor(starts, device=DEVICE), torch.tensor(q_lens, device=DEVICE)
    want = paged_prefill_attention_ref(q, k, v, tables, q_start, q_len, ctx, d**-0.5, out=torch.zeros_like(q))
    got = paged_prefill_attention(q, k, v, tables, q_start, q_len, ctx, d**-0.5, out=torch.full_like(q, float("nan")))
    real = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    for s, t in zip(starts, q_lens):
        real[s : s + t] = True
    assert torch.isnan(got[~real]).all(), "rows outside every sequence must not be written"
    assert_close(got[real], want[real], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128), (8, 1, 64)], ids=lambda h: f"h{h[0]}-kv{h[1]}-d{h[2]}")
def test_rope_kv_write(heads, dtype):
    hq, hkv, d = heads
    n, block_size, num_blocks = 23, 16, 4
    gen = torch.Generator().manual_seed(hq + d)
    # q, k, v as views of one fused projection output, as the engine will produce them.
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    positions = torch.randint(0, 4096, (n,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(DEVICE)
    slots[::5] = -1  # padding tokens are not stored
    cos, sin = rope_tables(4096, d, 10000.0, device=DEVICE)
    caches = [torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    want_q = rope_kv_write_ref(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    got_q = rope_kv_write(q, k, v, positions, cos, sin, caches[2], caches[3], slots, q_out=torch.full_like(q, float("nan")))
    assert_close(got_q, want_q, dtype)
    flat = [c.view(-1, hkv, d) for c in caches]
    written = slots[slots >= 0]
    assert_close(flat[2][written], flat[0][written], dtype)
    assert_close(flat[3][written], flat[1][written], dtype)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.isnan(flat[2][untouched]).all() and torch.isnan(flat[3][untouched]).all()
    # k_out = k: the rotated keys of the stored tokens also land in place (padding rows keep theirs).
    want_k, got_k = k.clone(), k.clone()
    rope_kv_write_ref(q, k, v, positions, cos, sin, caches[0], caches[1], slots, k_out=want_k)
    rope_kv_write(q, got_k, v, positions, cos, sin, caches[2], caches[3], slots, k_out=got_k)
    assert_close(got_k, want_k, dtype)
    assert torch.equal(got_k[slots < 0], k[slots < 0]) and not torch.allclose(got_k[slots >= 0], k[slots >= 0])


# (feature rows, vision width, text width, activation, two layers)
PROJECTOR_CASES = [
    (50, 48, 64, "gelu", True),  # LLaVA-1.5's 2-layer GELU MLP, rows not a multiple of the tile
    (9, 32, 40, "gelu_pytorch_tanh", True),
    (37, 64, 96, "linear", False),  # LLaVA's single W
    (130, 64, 160, "gelu", True),  # several row and column tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROJECTOR_CASES, ids=lambda c: f"m{c[0]}-{c[1]}x{c[2]}-{c[3]}")
def test_fused_projector(case, dtype):
    m, din, h, act, two = case
    gen = torch.Generator().manual_seed(m)
    rand = lambda *s: (torch.randn(*s, generator=gen) / s[-1] ** 0.5).to(DEVICE, dtype)  # noqa: E731
    x, w1, b1 = rand(m, din), rand(h, din), rand(h)
    w2, b2 = (rand(h, h), rand(h)) if two else (None, None)
    total = m + 17
    rows = (torch.randperm(total, generator=gen)[:m]).to(DEVICE)
    embeds = torch.randn(total, h, generator=gen).to(DEVICE, dtype)  # token embeddings already in place
    want = fused_projector_ref(x, w1, b1, w2, b2, act, embeds.clone(), rows)
    poisoned = embeds.clone()
    poisoned[rows] = float("nan")
    got = fused_projector(x, w1, b1, w2, b2, act, poisoned, rows)
    assert got is poisoned
    assert_close(got, want, dtype)
    if two:  # no bias on the second layer, as with multimodal_projector_bias=False
        want = fused_projector_ref(x, w1, None, w2, None, act, embeds.clone(), rows)
        assert_close(fused_projector(x, w1, None, w2, None, act, poisoned, rows), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width,with_residual", [(1, 64, True), (7, 96, True), (5, 64, False)])
def test_add_rmsnorm(rows, width, with_residual, dtype):
    """The residual becomes x + residual in place; out is RMSNorm of it (a width that is not a power of 2 too)."""
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(rows, width, generator=gen).to(DEVICE, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(DEVICE, dtype)
    before = None if residual is None else residual.clone()
    want_residual = None if residual is None else residual.clone()
    want = add_rmsnorm_ref(x, want_residual, weight, 1e-5)
    got = add_rmsnorm(x, residual, weight, 1e-5, out=torch.full_like(x, float("nan")))
    assert_close(got, want, dtype)
    if with_residual:
        assert_close(residual, (x.float() + before.float()).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,inner", [(1, 48), (3, 1100)])
def test_silu_mul(rows, inner, dtype):
    """silu(gate) * up from [gate | up] rows; 1100 columns span two program blocks."""
    gen = torch.Generator().manual_seed(rows + inner)
    gate_up = (2 * torch.randn(rows, 2 * inner, generator=gen)).to(DEVICE, dtype)
    want = silu_mul_ref(gate_up)
    got = silu_mul(gate_up, out=torch.full((rows, inner), float("nan"), dtype=dtype, device=DEVICE))
    assert_close(got, want, dtype)
