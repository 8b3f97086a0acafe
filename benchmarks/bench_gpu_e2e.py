"""End to end on LLaVA-1.5-7B shapes: our torch engine (Triton kernels, CUDA graphs) vs transformers' eager generate.

    python benchmarks/bench_gpu_e2e.py [--out PATH]    # on a GPU: fp16, random weights built on the GPU
    python benchmarks/bench_gpu_e2e.py --smoke         # CPU, the tiny preset, fp32: checks the script runs

Random weights (normal, std 0.02) are made directly on the device, in transformers' model, and
our model takes the very same tensors (no checkpoint is written, no second copy). transformers
runs first; then its model is dropped, so ours holds the weights alone (its peak memory is its own). Both sides get
the same ids: BOS + 576 image tokens + 40 text tokens, greedy, EOS ignored.

    decode_ms_per_token   batch 1, median step time of --new-tokens steps after the first token
    ttft_ms               1 image + 40 text tokens: image encoding + prefill + the first token
    encode_ms, prefill_ms ours: the two halves of that, timed apart (a sync between them)
    decode_ms_per_token_generate  ours: the same through generate() (each step queued before the
                          last one's token is read), (total - TTFT) / (tokens - 1)
    tok_s_32              --concurrent requests at once, generated tokens / wall time (prefill included)
    concurrent_prefill_s  ... of which the batch's prefill (its first tokens' median time)
    tok_s_concurrent_stepwise  ours: the same batch with overlap_decode off (every step waits for
                          its tokens before the next is queued)
    The batch's 32 requests ask about 4 images (8 each, different text). Ours starts each timed batch
    with an empty prefix cache: the first request of each image computes its image's blocks, the
    other 7 start on them (prefix caching). For the difference:
    tok_s_concurrent_no_prefix_cache  ours: the same batch with prefix caching off
    tok_s_concurrent_distinct_images  ours: 32 requests on 32 different images (nothing to share)
    peak_mem_GiB          torch.cuda.max_memory_allocated over that side's runs (weights included)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llava_rt.benchmarks.common import median, print_table, write_json
from llava_rt.checkpoint import to_internal_name
from llava_rt.model import LlavaForConditionalGeneration
from llava_rt.random_checkpoint import preset
from llava_rt.runtime.engine import SequenceInput
from llava_rt.runtime.generate import GenerationRequest, generate
from llava_rt.runtime.kv_cache import image_key
from llava_rt.runtime.sampling import SamplingParams
from llava_rt.runtime.torch_engine import TorchEngine


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_models(preset_name: str, dev: str, dtype: torch.dtype, seed: int = 0):
    """transformers' model with random weights on dev, and ours sharing its tensors."""
    import transformers

    cfg, _ = preset(preset_name)
    hf_cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**cfg.vision_config.to_dict()),
        text_config=transformers.LlamaConfig(**{k: v for k, v in cfg.text_config.to_dict().items() if k != "rope_theta"}),
        image_token_index=cfg.image_token_index, image_seq_length=cfg.image_seq_length,
        vision_feature_layer=cfg.vision_feature_layer, projector_hidden_act=cfg.projector_hidden_act,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
        with torch.device("meta"):
            ours = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02)
    state = {to_internal_name(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if "post_layernorm" not in k]
    if missing:
        raise RuntimeError(f"weights missing from transformers' model: {missing[:5]}")
    return cfg, hf, ours.eval()


def prompt(cfg, text_tokens: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    text = rng.integers(10, min(cfg.text_config.vocab_size, cfg.image_token_index) - 1, text_tokens).tolist()
    return [1] + [cfg.image_token_index] * cfg.image_seq_length + text


def run_ours(engine, cfg, args, pixels, distinct_pixels) -> dict:
    ids = prompt(cfg, args.text_tokens, 0)
    greedy = lambda logits: int(np.argmax(logits[0]))  # noqa: E731

    def one():
        sync()
        t0 = time.perf_counter()
        emb = engine.encode_images(pixels[:1])
        tok = greedy(engine.prefill([SequenceInput(0, ids, emb)]))
        ttft = time.perf_counter() - t0
        steps, toks = [], [tok]
        for _ in range(args.new_tokens - 1):
            t1 = time.perf_counter()
            tok = greedy(engine.decode([0], [tok]))
            steps.append(time.perf_counter() - t1)
            toks.append(tok)
        engine.release(0)
        return ttft, median(steps), toks

    one()  # warm-up (Triton compiles)
    runs = [one() for _ in range(args.repeats)]

    def split_ttft():  # the same TTFT with a sync between its two halves
        sync()
        t0 = time.perf_counter()
        emb = engine.encode_images(pixels[:1])
        sync()
        t1 = time.perf_counter()
        engine.prefill([SequenceInput(0, ids, emb)])
        t2 = time.perf_counter()
        engine.release(0)
        return t1 - t0, t2 - t1
    halves = [split_ttft() for _ in range(max(args.repeats, 5))]
    def requests(images):  # request i asks about images[i % len(images)]
        emb = engine.encode_images(images)
        return [GenerationRequest(prompt(cfg, args.text_tokens, i), emb[i % len(images) : i % len(images) + 1],
                                  SamplingParams(max_new_tokens=args.batch_new_tokens, ignore_eos=True),
                                  [image_key(images[i % len(images)])])
                for i in range(args.concurrent)]

    reqs = requests(pixels)
    overlap = engine.overlap_decode

    def batch(requests, overlap_decode, prefix_caching=True):
        engine.overlap_decode, engine.blocks.prefix_caching = overlap_decode, prefix_caching
        engine.reset_prefix_cache()  # a cold start: only this batch's own requests share blocks
        sync()
        t0 = time.perf_counter()
        outs = generate(engine, requests, set())
        sync()
        engine.overlap_decode, engine.blocks.prefix_caching = overlap, True
        return outs, time.perf_counter() - t0

    batch(reqs[:2], overlap)  # warm-up at a small batch
    outs, total = batch(reqs, overlap)
    # generate() at batch 1, as llava-infer decodes: with overlap_decode each step is queued before
    # the last one's token is read, where the loop above waits for every token
    alone = [batch(reqs[:1], overlap)[0][0] for _ in range(args.repeats)]
    r = {"ttft_ms": median([r[0] for r in runs]) * 1e3, "decode_ms_per_token": median([r[1] for r in runs]) * 1e3,
         "decode_ms_per_token_generate": median([(o.total_s - o.ttft_s) / max(len(o.token_ids) - 1, 1) for o in alone]) * 1e3,
         "encode_ms": median([h[0] for h in halves]) * 1e3, "prefill_ms": median([h[1] for h in halves]) * 1e3,
         "tok_s_concurrent": sum(len(o.token_ids) for o in outs) / total,
         "concurrent_prefill_s": median([o.ttft_s for o in outs]), "concurrent_total_s": total,
         "overlap_decode": overlap, "tokens": runs[0][2]}
    if overlap:  # the same batch a step at a time, for the difference
        stepwise, total_stepwise = batch(reqs, False)
        assert [o.token_ids for o in stepwise] == [o.token_ids for o in outs], "overlapped decoding changed the tokens"
        r["tok_s_concurrent_stepwise"] = sum(len(o.token_ids) for o in stepwise) / total_stepwise
    uncached, total_uncached = batch(reqs, overlap, prefix_caching=False)
    r["tok_s_concurrent_no_prefix_cache"] = sum(len(o.token_ids) for o in uncached) / total_uncached
    r["concurrent_prefill_s_no_prefix_cache"] = median([o.ttft_s for o in uncached])
    # fp16 sums in another order may break a near tie another way; count the requests that agree
    r["prefix_cache_same_tokens"] = sum(a.token_ids == b.token_ids for a, b in zip(outs, uncached))
    distinct, total_distinct = batch(requests(distinct_pixels), overlap)
    r["tok_s_concurrent_distinct_images"] = sum(len(o.token_ids) for o in distinct) / total_distinct
    return r


def run_transformers(hf, cfg, args, pixels, dev) -> dict:
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt(cfg, args.text_tokens, 0)], device=dev)
    px = pixels[:1]

    def timed(n, input_ids, pix):
        sync()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=input_ids, pixel_values=pix, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        timed(2, ids, px)  # warm-up
        ttft = median([timed(1, ids, px)[0] for _ in range(args.repeats)])
        total, out = timed(args.new_tokens, ids, px)
        decode = (total - ttft) / (args.new_tokens - 1)
        batch_ids = torch.tensor([prompt(cfg, args.text_tokens, i) for i in range(args.concurrent)], device=dev)
        batch_px = pixels[torch.arange(args.concurrent) % len(pixels)]
        wall, outs = timed(args.batch_new_tokens, batch_ids, batch_px)
    return {"ttft_ms": ttft * 1e3, "decode_ms_per_token": decode * 1e3,
            "tok_s_concurrent": args.concurrent * args.batch_new_tokens / wall,
            "tokens": out[0, ids.shape[1]:].tolist()}


def rounded(r: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32: checks the script runs")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens for the batch-1 decode timing")
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--batch-new-tokens", type=int, default=128, help="tokens per request in the concurrent run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/e2e-gpu-DATE.json)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("bench_gpu_e2e: no CUDA GPU; run with --smoke for the CPU plumbing check")
    if args.smoke:
        args.new_tokens, args.concurrent, args.batch_new_tokens, args.repeats = 6, 3, 5, 1
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    t0 = time.perf_counter()
    cfg, hf, ours = build_models("llava-1.5-7b" if cuda else "tiny", dev, dtype)
    print(f"built random {'llava-1.5-7b fp16' if cuda else 'tiny fp32'} weights on {dev} in {time.perf_counter() - t0:.1f} s")
    size = cfg.vision_config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    if not args.no_transformers:  # first, so that ours then holds the weights alone
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = run_transformers(hf, cfg, args, pixels.to(dev, dtype), dev)
        if cuda:
            r["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append({"engine": "transformers eager generate", **rounded(r)})
    del hf
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = TorchEngine(ours, block_size=16, kv_cache_bytes=(16 << 30) if cuda else (64 << 20),
                         max_num_seqs=max(args.concurrent, 1))
    setup_s = time.perf_counter() - t0
    if args.smoke:
        engine.overlap_decode = True  # the GPU's decoding, so the smoke run checks its plumbing too
    distinct = torch.randn(args.concurrent, 3, size, size, generator=torch.Generator().manual_seed(1))
    r = run_ours(engine, cfg, args, pixels.numpy(), distinct.numpy())
    r.update(kernels=engine.use_kernels, cuda_graphs=engine.graphs is not None and engine.graphs.capture,
             setup_s=round(setup_s, 1))
    if cuda:
        r["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    rows.insert(0, {"engine": "llava-rt torch", **rounded(r)})
    if len(rows) == 2:
        a, b = rows[0]["tokens"], rows[1]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"greedy tokens: the first {same} of {len(a)} agree with transformers (fp16 ties may split them)")
        rows[0]["tokens_equal_to_transformers"] = same
    print_table(rows, ["engine", "ttft_ms", "decode_ms_per_token", "tok_s_concurrent", "peak_mem_GiB"])
    goals = {"decode_ms_per_token": 5.3, "ttft_ms": 20.0, "tok_s_concurrent_32": 3000.0}
    path = write_json("e2e-gpu" if cuda else "e2e-cpu-smoke", {
        "preset": "llava-1.5-7b" if cuda else "tiny", "dtype": str(dtype), "text_tokens": args.text_tokens,
        "image_tokens": cfg.image_seq_length, "new_tokens": args.new_tokens, "concurrent": args.concurrent,
        "batch_new_tokens": args.batch_new_tokens, "goals_h100": goals, "smoke": not cuda, "rows": rows,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
