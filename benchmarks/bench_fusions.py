"""Which fusions pay on the GPU, at LLaVA-1.5-7B decoder shapes (fp16): the numbers behind
`llava_rt.model.fuse_projections` and the CUDA RMSNorm.

    python benchmarks/bench_fusions.py [--out PATH]   # CUDA only

For rows m in (1, 32, 617) (a decode step, a batch of 32, a 1-image prompt):
    rmsnorm_ours / rmsnorm_F     the model's RMSNorm math (~7 kernels) vs torch's fused F.rms_norm,
                                 both after the residual add; rmsnorm_maxdiff: their largest difference
    qkv_3x / qkv_1x              three q/k/v GEMMs vs one on the concatenated weight
    mlp_2x_silu_mul / mlp_1x     gate and up as two GEMMs vs one, then silu * up
    down                         the down projection alone (for scale)
    ideal_layer_bytes            one layer's weights read once at 4.25 TB/s (the copy ceiling measured by bench_kernels.py)
Each time is the GPU time of one call: 50 calls captured in a CUDA graph, replayed, median of 5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llava_rt.benchmarks.common import cuda_graph_seconds, write_json
from llava_rt.model import RMSNorm


def graph_us(fn) -> float:
    return cuda_graph_seconds(fn, calls=50) * 1e6


@torch.inference_mode()
def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_fusions: needs a CUDA GPU")
    dev, dt, hidden, inner = "cuda", torch.float16, 4096, 11008
    res = {}
    norm = RMSNorm(hidden, 1e-5).to(dev, dt)
    for m in (1, 32, 617):
        x = torch.randn(m, hidden, device=dev, dtype=dt)
        r = torch.randn_like(x)
        res[f"rmsnorm_ours_m{m}_us"] = graph_us(lambda: norm(x + r))
        res[f"rmsnorm_F_m{m}_us"] = graph_us(lambda: F.rms_norm(x + r, (hidden,), norm.weight, 1e-5))
        h = (x + r).float()
        unfused = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)
        res[f"rmsnorm_maxdiff_m{m}"] = (unfused.float() - F.rms_norm(x + r, (hidden,), norm.weight, 1e-5).float()).abs().max().item()
        wq, wk, wv = (torch.randn(hidden, hidden, device=dev, dtype=dt) * 0.02 for _ in range(3))
        wqkv = torch.cat([wq, wk, wv])
        res[f"qkv_3x_m{m}_us"] = graph_us(lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)))
        res[f"qkv_1x_m{m}_us"] = graph_us(lambda: F.linear(x, wqkv))
        wg, wu = (torch.randn(inner, hidden, device=dev, dtype=dt) * 0.02 for _ in range(2))
        wgu = torch.cat([wg, wu])
        res[f"mlp_2x_silu_mul_m{m}_us"] = graph_us(lambda: F.silu(F.linear(x, wg)) * F.linear(x, wu))

        def fused():
            gate, up = F.linear(x, wgu).chunk(2, -1)
            return F.silu(gate) * up
        res[f"mlp_1x_silu_mul_m{m}_us"] = graph_us(fused)
        wd = torch.randn(hidden, inner, device=dev, dtype=dt) * 0.02
        act = torch.randn(m, inner, device=dev, dtype=dt)
        res[f"down_m{m}_us"] = graph_us(lambda: F.linear(act, wd))
        res[f"ideal_layer_bytes_m{m}_us"] = (4 * hidden * hidden + 3 * hidden * inner) * 2 / 4.25e12 * 1e6
    for k, v in res.items():
        print(f"{k:32s} {v:10.3f}")
    path = write_json("fusions-gpu", {"timing": "cuda graph replay of 50 calls, median of 5", "results": res}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
