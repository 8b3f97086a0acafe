"""Launch settings of the paged decode attention kernel at the engine's shapes (LLaVA-1.5-7B).

    python benchmarks/sweep_decode.py [--out PATH]   # on a GPU
    python benchmarks/sweep_decode.py --smoke        # CPU, Triton's interpreter: checks the script runs

The engine's decode graphs pass block tables as wide as the model's context (4096 tokens = 256
blocks of 16), so the splits come from that width, as here. For each batch size (contexts of
~one image + a short answer) it times every (keys per tile, warps, stages, splits) setting as GPU
time (20 calls in a CUDA graph, replayed), with the default marked, and gives GB/s of K/V read.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of a kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from llava_rt.benchmarks.common import cuda_graph_seconds, print_table, write_json
from llava_rt.kernels.paged_attention import default_num_splits, paged_decode_attention


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not SMOKE
    if not cuda and not SMOKE:
        sys.exit("sweep_decode: no CUDA GPU; run with --smoke for the CPU plumbing check")
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    heads, d, page, width = (32, 128, 16, 256) if cuda else (4, 16, 4, 8)
    batches, ctx = ((1, 32), 700) if cuda else ((1, 3), 20)
    grid = itertools.product((32, 64, 128), (4, 8), (2, 3)) if cuda else [(16, 4, 2)]
    grid = list(grid)
    time = cuda_graph_seconds if cuda else (lambda fn: (fn(), 0.0)[1])
    rows = []
    for b in batches:
        n_blocks = -(-ctx // page)
        k = torch.randn(b * n_blocks + 1, page, heads, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        tables = torch.zeros(b, width, dtype=torch.long, device=dev)
        tables[:, :n_blocks] = torch.randperm(b * n_blocks, device=dev).view(b, n_blocks) + 1
        lens = torch.full((b,), ctx, device=dev)
        q = torch.randn(b, heads, d, dtype=dtype, device=dev)
        want = paged_decode_attention(q, k, v, tables, lens, d**-0.5)
        nbytes = 2 * b * ctx * heads * d * k.element_size()
        for block_n, warps, stages in grid:
            default_split = default_num_splits(b, heads, width * page, block_n)
            for splits in sorted({default_split, max(1, default_split * 2), max(1, default_split // 2)}):
                fn = lambda: paged_decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=splits,  # noqa: E731
                                                    block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    torch.testing.assert_close(fn(), want, rtol=2e-2, atol=2e-2)
                    sec = time(fn)
                except Exception as e:  # a setting that does not compile (shared memory) is reported, not fatal
                    rows.append({"batch": b, "block_n": block_n, "warps": warps, "stages": stages, "splits": splits,
                                 "error": f"{type(e).__name__}: {str(e)[:80]}"})
                    continue
                rows.append({"batch": b, "block_n": block_n, "warps": warps, "stages": stages, "splits": splits,
                             "us": round(sec * 1e6, 1), "GBps": round(nbytes / sec / 1e9, 1) if sec else None,
                             "default": (block_n, warps, stages, splits) == (64, 4, 2 if d > 64 else 3, default_split)})
    ok = [r for r in rows if "us" in r]
    for b in batches:
        best = sorted((r for r in ok if r["batch"] == b), key=lambda r: r["us"])[:5]
        default = [r for r in ok if r["batch"] == b and r["default"]]
        print(f"\nbatch {b}, context {ctx}: the five fastest, then the default")
        print_table(best + default, ["block_n", "warps", "stages", "splits", "us", "GBps"])
    path = write_json("sweep-decode" if cuda else "sweep-decode-cpu-smoke",
                      {"heads": heads, "head_dim": d, "page": page, "table_width": width, "context": ctx,
                       "smoke": not cuda, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
