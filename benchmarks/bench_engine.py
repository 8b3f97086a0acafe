"""TTFT and decode tokens/s: our torch engine vs transformers' generate, same checkpoint, one run.

    python benchmarks/bench_engine.py [--preset mid] [--new-tokens 64] [--repeats 5] [--batch 1 4]

A random-weight checkpoint of the preset's shapes is made in a temp dir (or pass --model).
Both sides get the same token ids (1 image + --text-tokens text tokens) and pixels, greedy,
EOS ignored so every run makes exactly --new-tokens tokens. TTFT = image encoding + prefill +
the first token; decode tokens/s = (new_tokens - 1) / (total - TTFT), per sequence. Both come from
one generation (ours: the first token's callback; transformers: a streamer's first new token).

Then a new question about an image an earlier prompt asked about (a chat's next turn, or another
user on the same picture): our prefill of it with that prompt's blocks cached (prefix caching: the
BOS and image rows are not computed again) against prefill with prefix caching off, in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llava_rt.benchmarks.common import median, print_table, write_json
from llava_rt.config import LlavaConfig
from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.engine import SequenceInput
from llava_rt.runtime.generate import GenerationRequest, generate
from llava_rt.runtime.kv_cache import image_key
from llava_rt.runtime.sampling import SamplingParams
from llava_rt.runtime.torch_engine import TorchEngine


def make_inputs(cfg: LlavaConfig, batch: int, text_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = [[cfg.text_config.bos_token_id or 1] + [cfg.image_token_index] * cfg.image_seq_length
           + rng.integers(10, min(cfg.text_config.vocab_size, cfg.image_token_index) - 1, text_tokens).tolist()
           for _ in range(batch)]
    size = cfg.vision_config.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, pixels


def time_ours(engine: TorchEngine, ids, pixels, new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = []
    embeds = engine.encode_images(pixels)
    reqs = [GenerationRequest(x, embeds[i : i + 1], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            for i, x in enumerate(ids)]
    outs = generate(engine, reqs, set(), on_token=lambda i, t: first.append(time.perf_counter()) if not first else None)
    total = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return first[0] - start, total


def time_follow_up(engine: TorchEngine, cfg: LlavaConfig, text_tokens: int, repeats: int) -> dict:
    """Prefill of a new question on an image whose earlier prompt is cached, with prefix caching on and off."""
    (first, second), pixels = make_inputs(cfg, 2, text_tokens, seed=7)
    second = first[: 1 + cfg.image_seq_length] + second[1 + cfg.image_seq_length :]  # the same image, other text
    embeds, key = engine.encode_images(pixels[:1]), [image_key(pixels[0])]

    def prefill(ids, seq_id):
        t0 = time.perf_counter()
        engine.prefill([SequenceInput(seq_id, ids, embeds, key)])
        return time.perf_counter() - t0

    times, hits = {}, []
    for caching in (True, False):
        engine.blocks.prefix_caching = caching
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            engine.reset_prefix_cache()
            prefill(first, 0)
            engine.release(0)
            before = engine.blocks.stats["prefix_hit_tokens"]
            runs.append(prefill(second, 1))
            hits.append(engine.blocks.stats["prefix_hit_tokens"] - before)
            engine.release(1)
        times[caching] = median(runs[1:])
    engine.blocks.prefix_caching = True
    return {"prompt_tokens": len(second), "cached_tokens": max(hits), "prefill_ms_prefix_cached": round(times[True] * 1e3, 1),
            "prefill_ms_no_prefix_caching": round(times[False] * 1e3, 1)}


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def time_transformers(hf, ids, pixels, new_tokens: int) -> tuple[float, float]:
    input_ids = torch.tensor(ids)
    px = torch.from_numpy(pixels)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    clock = _FirstTokenClock()  # TTFT from the same call, so decode time = total - TTFT is never negative
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(input_ids=input_ids, pixel_values=px, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          streamer=clock, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] - input_ids.shape[1] == new_tokens and clock.first is not None
    return clock.first - t0, total


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: a random one of --preset)")
    p.add_argument("--preset", default="mid", choices=["tiny", "mid", "llava-1.5-7b"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/engine-cpu-DATE.json)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_random_checkpoint(Path(tmp) / "model", args.preset)
        cfg = LlavaConfig.load(model_dir)
        engine = TorchEngine.load(model_dir)
        hf = None
        if not args.no_transformers:
            from transformers import LlavaForConditionalGeneration

            hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        rows = []
        for batch in args.batch:
            ids, pixels = make_inputs(cfg, batch, args.text_tokens, seed=batch)
            sides = [("llava-rt torch", lambda: time_ours(engine, ids, pixels, args.new_tokens))]
            if hf is not None:
                sides.append(("transformers generate", lambda: time_transformers(hf, ids, pixels, args.new_tokens)))
            for name, fn in sides:
                fn()  # warm-up
                runs = [fn() for _ in range(args.repeats)]
                ttft = median([r[0] for r in runs])
                decode_s = median([r[1] - r[0] for r in runs])
                per_seq = (args.new_tokens - 1) / decode_s
                rows.append({
                    "engine": name, "batch": batch, "ttft_ms": round(ttft * 1e3, 1),
                    "decode_ms_per_step": round(decode_s / (args.new_tokens - 1) * 1e3, 2),
                    "decode_tok_s_per_seq": round(per_seq, 1), "decode_tok_s_total": round(per_seq * batch, 1),
                })
        follow_up = time_follow_up(engine, cfg, args.text_tokens, args.repeats)
        print(f"preset={args.preset} text_tokens={args.text_tokens} image_tokens={cfg.image_seq_length} "
              f"new_tokens={args.new_tokens} repeats={args.repeats} (medians)")
        print_table(rows, ["engine", "batch", "ttft_ms", "decode_ms_per_step", "decode_tok_s_per_seq", "decode_tok_s_total"])
        print(f"a new question on a seen image ({follow_up['prompt_tokens']} tokens, {follow_up['cached_tokens']} "
              f"cached): prefill {follow_up['prefill_ms_prefix_cached']} ms with prefix caching, "
              f"{follow_up['prefill_ms_no_prefix_caching']} ms without")
        path = write_json("engine-cpu", {
            "preset": args.preset if args.model is None else str(args.model), "text_tokens": args.text_tokens,
            "image_tokens": cfg.image_seq_length, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "dtype": "float32", "rows": rows, "follow_up": follow_up,
        }, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
