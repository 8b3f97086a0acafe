"""Where the torch engine's time goes: per-phase wall times and each phase's top kernels.

    python benchmarks/profile_gpu.py [--out PATH]   # on a GPU: LLaVA-1.5-7B shapes, fp16, random weights
    python benchmarks/profile_gpu.py --smoke        # CPU, the tiny preset: checks the script runs

Phases (1 image + 40 text tokens, as in bench_gpu_e2e.py):
    encode            engine.encode_images on one image
    encode_replay     the vision tower's CUDA graph replay alone
    prefill           engine.prefill of the 617-token prompt (projector, decoder, first logits),
                      through the prefill CUDA graph of its length bucket
    prefill_eager     the same without the prefill graphs (op by op)
    decode_bN         engine.decode at batch N: host work, graph replay, logits back to the host
    decode_bN_greedy  the same with greedy_only: only the argmax tokens come back
    decode_bN_overlapped  per step, 10 greedy steps each queued (decode_async) before the last
                      one's tokens are read, as generate() runs them
    replay_bN         the CUDA graph's replay alone (what the GPU needs for the step)
For encode, prefill (both ways) and an eager decode step (the graph's body run op by op) it records the
kernels with torch.profiler: the sum of kernel time against the wall time says whether the phase
waits on the GPU or on Python launching kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llava_rt.benchmarks.bench_gpu_e2e import build_models, prompt, sync
from llava_rt.benchmarks.common import median, print_table, write_json
from llava_rt.runtime.engine import SequenceInput
from llava_rt.runtime.torch_engine import TorchEngine


def timed(fn, repeats: int) -> float:
    """Median wall ms of fn(), synchronised, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def kernels(fn, top: int) -> dict:
    """Run fn() under torch.profiler: wall ms, summed kernel ms, and the top kernels by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    # Kernels on a GPU (the ops that launch them carry the same time again, so they are left out);
    # on the CPU (smoke) the ops' own time stands in for them.
    if torch.cuda.is_available():
        from torch.autograd import DeviceType

        self_us = lambda e: e.self_device_time_total if e.device_type == DeviceType.CUDA else 0  # noqa: E731
    else:
        self_us = lambda e: e.self_cpu_time_total  # noqa: E731
    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=self_us, reverse=True)
    total_us = sum(self_us(e) for e in events)
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": round(self_us(e) / 1e3, 3),
             "share": round(self_us(e) / max(total_us, 1e-9), 3)} for e in events[:top]]
    return {"wall_ms": round(wall * 1e3, 2), "kernel_ms": round(total_us / 1e3, 2),
            "launches": sum(e.count for e in events), "top": rows}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("profile_gpu: no CUDA GPU; run with --smoke for the CPU plumbing check")
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    cfg, hf, ours = build_models("llava-1.5-7b" if cuda else "tiny", dev, dtype)
    del hf
    engine = TorchEngine(ours, block_size=16, kv_cache_bytes=(16 << 30) if cuda else (64 << 20),
                         max_num_seqs=max(args.batch), static_decode=True)
    size = cfg.vision_config.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    ids = prompt(cfg, args.text_tokens, 0)
    emb = engine.encode_images(pixels)

    def prefill(seq_id=0):
        engine.prefill([SequenceInput(seq_id, ids, emb)])

    def prefill_once():
        prefill()
        engine.release(0)

    phases, profiles = {}, {}
    phases["encode"] = timed(lambda: engine.encode_images(pixels), 5)
    if engine.encode_graphs is not None:
        graph = next(iter(engine.encode_graphs.graphs.values()))[0]
        phases["encode_replay"] = timed(graph.replay, 5)
    phases["prefill"] = timed(prefill_once, 5)
    graphs, engine.prefill_graphs = engine.prefill_graphs, None
    phases["prefill_eager"] = timed(prefill_once, 5)
    profiles["prefill_eager"] = kernels(prefill_once, args.top)
    engine.prefill_graphs = graphs
    profiles["encode"] = kernels(lambda: engine.encode_images(pixels), args.top)
    profiles["prefill"] = kernels(prefill_once, args.top)
    for b in args.batch:
        for s in range(b):
            prefill(s)
        seqs, toks = list(range(b)), [7] * b
        phases[f"decode_b{b}"] = timed(lambda: engine.decode(seqs, toks), 10)
        phases[f"decode_b{b}_greedy"] = timed(lambda: engine.decode(seqs, toks, greedy_only=True), 10)

        def overlapped(steps=10):  # as generate() decodes: each step queued before the last one's tokens are read
            pending = engine.decode_async(seqs, toks)
            for _ in range(steps - 1):
                queued = engine.decode_async(seqs, (pending, list(range(b))))
                pending.result()
                pending = queued
            pending.result()
        phases[f"decode_b{b}_overlapped"] = timed(overlapped, 3) / 10
        g = engine.graphs
        bucket = g.bucket(b)
        if bucket is not None:
            if g.capture:
                phases[f"replay_b{b}"] = timed(lambda: g.graphs[bucket].replay(), 10)
            profiles[f"decode_b{b}_eager"] = kernels(lambda: g._step(bucket), args.top)
        for s in seqs:
            engine.release(s)
    print_table([{"phase": k, "ms": round(v, 3)} for k, v in phases.items()], ["phase", "ms"])
    for name, prof in profiles.items():
        print(f"\n{name}: wall {prof['wall_ms']} ms, kernels {prof['kernel_ms']} ms in {prof['launches']} launches")
        print_table(prof["top"], ["kernel", "calls", "ms", "share"])
    path = write_json("profile-gpu" if cuda else "profile-cpu-smoke", {
        "preset": "llava-1.5-7b" if cuda else "tiny", "dtype": str(dtype), "text_tokens": args.text_tokens,
        "phases_ms": {k: round(v, 3) for k, v in phases.items()}, "profiles": profiles, "smoke": not cuda,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
