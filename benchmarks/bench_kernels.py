"""Each Triton kernel against torch / SDPA / cuBLAS, at LLaVA-1.5-7B shapes, with the card's ceilings.

    python benchmarks/bench_kernels.py [--out PATH]      # on a GPU
    python benchmarks/bench_kernels.py --smoke           # CPU, tiny shapes, Triton's interpreter

The ceilings are measured in the same run: copy bandwidth (a 1 GiB device-to-device copy,
bytes read + written) and fp16 matmul (8192^3, cuBLAS). Times are GPU time: 20 calls captured in
a CUDA graph and replayed (how the decode step runs them), so a small kernel's time is not its
Python launch cost. The ceilings, and the one baseline that syncs with the host
(rope_kv_write_ref's boolean indexing), are timed with triton's do_bench instead. Each row gives the kernel's median time,
what it achieved (GB/s for the memory-bound kernels, TFLOP/s for the projector and prefill) as a
fraction of the ceiling, and the baselines' times on the same inputs. The smoke run checks the
plumbing only: interpreter timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of a kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from llava_rt.benchmarks.common import cuda_graph_seconds, median, print_table, write_json
from llava_rt.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
)
from llava_rt.kernels.projector import fused_projector
from llava_rt.kernels.rmsnorm import add_rmsnorm
from llava_rt.kernels.rope_kv import rope_kv_write, rope_kv_write_ref, rope_tables
from llava_rt.kernels.swiglu import silu_mul, silu_mul_ref


EAGER = []  # what had to be timed with launches included (could not be captured)


def bench(fn, reps: int, eager: str = "") -> float:
    """Median seconds of fn(): GPU time from a CUDA graph on CUDA (eager=NAME for a function that
    syncs with the host, which no graph can hold: then timed with its launches), wall time on the CPU."""
    if torch.cuda.is_available():
        if not eager:
            return cuda_graph_seconds(fn)
        EAGER.append(eager)
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def ceilings(dev, smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 29)  # fp16 elements: 2 MiB / 1 GiB
    a = torch.empty(n, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    # Timed eagerly: both run long enough that launches do not count, and a copy inside a CUDA
    # graph becomes a copy-engine memcpy node, slower than the copy kernel (2.8 vs 4.3 TB/s, H200).
    copy_s = bench(lambda: b.copy_(a), 3, eager="ceiling: copy")
    m = 256 if smoke else 8192
    dt = torch.float32 if smoke else torch.float16
    x, y = torch.randn(m, m, dtype=dt, device=dev), torch.randn(m, m, dtype=dt, device=dev)
    mm_s = bench(lambda: x @ y, 3, eager="ceiling: matmul")
    return {"copy_GBps": 2 * n * 2 / copy_s / 1e9, "matmul_TFLOPs": 2 * m**3 / mm_s / 1e12}


def paged_cache(batch, ctx, kv_heads, d, block_size, dtype, dev):
    blocks = -(-ctx // block_size)
    k = torch.randn(batch * blocks, block_size, kv_heads, d, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * blocks, device=dev).view(batch, blocks)
    return k, v, tables, torch.full((batch,), ctx, device=dev)


def decode_rows(cfg, dev, dtype, ceil, reps):
    rows = []
    for batch, ctx, hq, hkv in cfg["decode"]:
        d, bs = cfg["head_dim"], cfg["block_size"]
        k, v, tables, lens = paged_cache(batch, ctx, hkv, d, bs, dtype, dev)
        q = torch.randn(batch, hq, d, dtype=dtype, device=dev)
        scale = d**-0.5
        ours = bench(lambda: paged_decode_attention(q, k, v, tables, lens, scale), reps)
        # Baselines: the model's torch path (gather the blocks, then SDPA) and SDPA on an already
        # contiguous cache (what a non-paged engine pays; no gather).
        def gathered():
            kk = k[tables].view(batch, -1, hkv, d).transpose(1, 2)
            vv = v[tables].view(batch, -1, hkv, d).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=hq != hkv)
        kd = k[tables].view(batch, -1, hkv, d).transpose(1, 2).contiguous()
        vd = v[tables].view(batch, -1, hkv, d).transpose(1, 2).contiguous()
        dense = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=hq != hkv), reps)
        gath = bench(gathered, reps)
        nbytes = 2 * batch * ctx * hkv * d * k.element_size()
        rows.append({"kernel": "paged_decode_attention", "shape": f"b{batch} ctx{ctx} h{hq}/{hkv} d{d} bs{bs}",
                     "ours_us": round(ours * 1e6, 1), "GBps": round(nbytes / ours / 1e9, 1),
                     "of_ceiling": round(nbytes / ours / 1e9 / ceil["copy_GBps"], 3),
                     "torch_gather_sdpa_us": round(gath * 1e6, 1), "sdpa_contiguous_us": round(dense * 1e6, 1)})
    return rows


def prefill_rows(cfg, dev, dtype, ceil, reps):
    rows = []
    for prev, new, hq, hkv in cfg["prefill"]:
        d, bs = cfg["head_dim"], cfg["block_size"]
        ctx = prev + new
        k, v, tables, lens = paged_cache(1, ctx, hkv, d, bs, dtype, dev)
        q = torch.randn(new, hq, d, dtype=dtype, device=dev)
        zero, qlen = torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([new], device=dev)
        scale = d**-0.5
        ours = bench(lambda: paged_prefill_attention(q, k, v, tables, zero, qlen, lens, scale, max_q_len=new), reps)
        kd = k[tables].view(1, -1, hkv, d).transpose(1, 2)[:, :, :ctx].contiguous()
        vd = v[tables].view(1, -1, hkv, d).transpose(1, 2)[:, :, :ctx].contiguous()
        qd = q.transpose(0, 1)[None].contiguous()
        if prev == 0:  # whole prompt: causal SDPA (flash attention on the GPU)
            sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=hq != hkv), reps)
        else:  # a chunk after a cached prefix: SDPA needs an explicit mask (no flash)
            mask = torch.arange(ctx, device=dev)[None] <= torch.arange(prev, ctx, device=dev)[:, None]
            sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=hq != hkv), reps)
        flops = 4 * hq * d * sum(prev + i + 1 for i in range(new))  # QK^T and PV over visible keys
        rows.append({"kernel": "paged_prefill_attention", "shape": f"prev{prev} new{new} h{hq}/{hkv} d{d}",
                     "ours_us": round(ours * 1e6, 1), "TFLOPs": round(flops / ours / 1e12, 2),
                     "of_ceiling": round(flops / ours / 1e12 / ceil["matmul_TFLOPs"], 3),
                     "sdpa_contiguous_us": round(sdpa * 1e6, 1)})
    return rows


def rope_rows(cfg, dev, dtype, ceil, reps):
    rows = []
    hq = hkv = cfg["heads"]
    d = cfg["head_dim"]
    for n in cfg["rope_tokens"]:
        q = torch.randn(n, hq, d, dtype=dtype, device=dev)
        k, v = torch.randn(n, hkv, d, dtype=dtype, device=dev), torch.randn(n, hkv, d, dtype=dtype, device=dev)
        cos, sin = rope_tables(4096, d, 10000.0, dev)
        kc = torch.zeros(-(-n // 16) + 1, 16, hkv, d, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        pos = torch.randint(0, 4096, (n,), device=dev)
        slots = torch.randperm(kc.shape[0] * 16, device=dev)[:n]
        qo = torch.empty_like(q)
        ours = bench(lambda: rope_kv_write(q, k, v, pos, cos, sin, kc, vc, slots, qo), reps)
        ref = bench(lambda: rope_kv_write_ref(q, k, v, pos, cos, sin, kc, vc, slots, qo), reps, "rope_kv_write_ref")
        nbytes = (2 * hq + 4 * hkv) * n * d * q.element_size()  # q in/out, k in/out, v in/out
        rows.append({"kernel": "rope_kv_write", "shape": f"n{n} h{hq}/{hkv} d{d}", "ours_us": round(ours * 1e6, 1),
                     "GBps": round(nbytes / ours / 1e9, 1), "of_ceiling": round(nbytes / ours / 1e9 / ceil["copy_GBps"], 3),
                     "torch_ref_us": round(ref * 1e6, 1)})
    return rows


def projector_rows(cfg, dev, dtype, ceil, reps):
    rows = []
    m, din, h = cfg["projector"]
    x = torch.randn(m, din, dtype=dtype, device=dev)
    w1, b1 = torch.randn(h, din, dtype=dtype, device=dev) / din**0.5, torch.zeros(h, dtype=dtype, device=dev)
    w2, b2 = torch.randn(h, h, dtype=dtype, device=dev) / h**0.5, torch.zeros(h, dtype=dtype, device=dev)
    total = m + 41
    out = torch.zeros(total, h, dtype=dtype, device=dev)
    rows_idx = torch.arange(1, m + 1, device=dev)
    is_image = torch.zeros(total, dtype=torch.bool, device=dev)
    is_image[rows_idx] = True
    for two in (True, False):
        w, b = (w2, b2) if two else (None, None)
        ours = bench(lambda: fused_projector(x, w1, b1, w, b, "gelu" if two else "linear", out, rows_idx), reps)

        def torch_path():  # the model's: Linear, GELU, Linear, then masked_scatter into the embeddings
            y = F.linear(x, w1, b1)
            if two:
                y = F.linear(F.gelu(y), w2, b2)
            return out.masked_scatter(is_image[:, None], y)
        base = bench(torch_path, reps)
        flops = 2 * m * din * h + (2 * m * h * h if two else 0)
        rows.append({"kernel": "fused_projector", "shape": f"m{m} {din}->{h}" + ("->gelu->" + str(h) if two else " linear"),
                     "ours_us": round(ours * 1e6, 1), "TFLOPs": round(flops / ours / 1e12, 2),
                     "of_ceiling": round(flops / ours / 1e12 / ceil["matmul_TFLOPs"], 3),
                     "cublas_torch_us": round(base * 1e6, 1)})
    return rows


def norm_act_rows(cfg, dev, dtype, ceil, reps):
    """add_rmsnorm against torch's add + F.rms_norm and the model's own RMSNorm math; silu_mul
    against F.silu(gate) * up; at the decoder's widths (hidden, intermediate)."""
    rows = []
    hidden, inner = cfg["widths"]
    for m in cfg["rows"]:
        x, r = torch.randn(m, hidden, dtype=dtype, device=dev), torch.randn(m, hidden, dtype=dtype, device=dev)
        w = torch.ones(hidden, dtype=dtype, device=dev)
        ours = bench(lambda: add_rmsnorm(x, r, w, 1e-5), reps)
        fused_torch = bench(lambda: F.rms_norm(x + r, (hidden,), w, 1e-5), reps)

        def model_math():  # RMSNorm.forward off the GPU path: fp32 statistics, ~7 kernels
            h = (x + r).float()
            return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        plain = bench(model_math, reps)
        nbytes = 4 * m * hidden * x.element_size()  # x and residual in, residual and out back
        rows.append({"kernel": "add_rmsnorm", "shape": f"m{m} {hidden}", "ours_us": round(ours * 1e6, 2),
                     "GBps": round(nbytes / ours / 1e9, 1), "of_ceiling": round(nbytes / ours / 1e9 / ceil["copy_GBps"], 3),
                     "torch_us": round(fused_torch * 1e6, 2), "torch_unfused_us": round(plain * 1e6, 2)})
        gu = torch.randn(m, 2 * inner, dtype=dtype, device=dev)
        ours = bench(lambda: silu_mul(gu), reps)
        base = bench(lambda: silu_mul_ref(gu), reps)
        nbytes = 3 * m * inner * gu.element_size()
        rows.append({"kernel": "silu_mul", "shape": f"m{m} {inner}", "ours_us": round(ours * 1e6, 2),
                     "GBps": round(nbytes / ours / 1e9, 1), "of_ceiling": round(nbytes / ours / 1e9 / ceil["copy_GBps"], 3),
                     "torch_us": round(base * 1e6, 2)})
    return rows


# LLaVA-1.5-7B: 32 heads of 128 (Vicuna-7B, MHA), 576 image tokens from a 1024-wide CLIP ViT-L.
# GQA rows (8 kv heads) show the kernel for Llama-3-style decoders.
FULL = {"head_dim": 128, "heads": 32, "block_size": 16,
        "decode": [(1, 616, 32, 32), (1, 4096, 32, 32), (32, 616, 32, 32), (32, 2048, 32, 32), (1, 4096, 32, 8),
                   (32, 2048, 32, 8)],
        "prefill": [(0, 616, 32, 32), (512, 104, 32, 32), (0, 2048, 32, 32)],
        "rope_tokens": [1, 32, 616], "projector": (576, 1024, 4096), "widths": (4096, 11008), "rows": [1, 32, 617]}
SMOKE_CFG = {"head_dim": 64, "heads": 4, "block_size": 16, "decode": [(1, 40, 4, 4), (2, 70, 8, 2)],
             "prefill": [(0, 20, 4, 4), (17, 9, 8, 2)], "rope_tokens": [3], "projector": (9, 32, 48),
             "widths": (64, 96), "rows": [3]}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter: checks the script runs")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/kernels-DEVICE-DATE.json)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("bench_kernels: no CUDA GPU; run with --smoke for the CPU plumbing check")
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    cfg, reps = (FULL, 5) if cuda else (SMOKE_CFG, 1)
    torch.manual_seed(0)
    ceil = ceilings(dev, not cuda)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.1f} TFLOP/s ({dtype})")
    rows = []
    for part in (decode_rows, prefill_rows, rope_rows, norm_act_rows, projector_rows):
        got = part(cfg, dev, dtype, ceil, reps)
        print_table(got, list(got[0]))
        print()
        rows += got
    if not cuda:  # the smoke run also checks the kernels still agree with a reference at these shapes
        k, v, tables, lens = paged_cache(2, 70, 2, 64, 16, dtype, dev)
        q = torch.randn(2, 8, 64)
        torch.testing.assert_close(paged_decode_attention(q, k, v, tables, lens, 0.125),
                                   paged_decode_attention_ref(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)
    if EAGER:
        print(f"timed with launches included (they sync, so no CUDA graph): {', '.join(sorted(set(EAGER)))}")
    name = "kernels-" + ("gpu" if cuda else "cpu-smoke")
    path = write_json(name, {"dtype": str(dtype), "ceilings": ceil, "timing": "cuda graph replay" if cuda else "wall",
                             "timed_eagerly": sorted(set(EAGER)), "smoke": not cuda, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
