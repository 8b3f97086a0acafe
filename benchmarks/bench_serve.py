"""Load benchmark of llava-serve: a concurrency sweep against transformers answering one at a time.

    python benchmarks/bench_serve.py [--preset mid] [--concurrency 1 4 16 64] [--requests 16] [--max-tokens 128]
                                     [--device cuda --dtype float16]   (the GPU suite)

A random-weight checkpoint of the preset is made in a temp dir (or pass --model). The server runs
in this process on loopback (uvicorn in a thread); clients stream over HTTP (httpx, SSE) from a
second process, as real clients would, so their parsing does not share the server's GIL. Half the
requests carry an image (a different one each, and the image cache is cleared between levels, so
no level reuses another's encodings), half are text-only; greedy, EOS ignored so every answer is
exactly --max-tokens tokens. Per level: TTFT p50/p99 (request sent to first SSE event), time per
output token after the first, output tokens/s over the whole level. The baseline is the LLaVA
repo's model worker: transformers' LlavaForConditionalGeneration.generate, one request at a time,
on the same prompts and pixels. On CUDA, where the scheduler decodes one step ahead, the top level
runs again with that off (top_level_decoding_step_by_step), for the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from llava_rt.benchmarks.common import print_table, write_json

QUESTIONS = ["What is in the image?", "Describe the image in detail.", "Which colors do you see?",
             "Write a short story about a red circle.", "List three shapes and where they are."]


def make_requests(n: int, image_size: int, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        item = {"question": QUESTIONS[i % len(QUESTIONS)], "image": None}
        if i % 2 == 0:
            pixels = rng.integers(0, 256, (image_size + 32, image_size + 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            item["image"] = buf.getvalue()
        out.append(item)
    return out


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def start_server(app) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


async def run_level(url: str, requests: list[dict], concurrency: int, max_tokens: int) -> dict:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    ttfts, tpots, tokens = [], [], 0

    async def one(client, item):
        nonlocal tokens
        content = [{"type": "text", "text": item["question"]}]
        if item["image"] is not None:
            url_ = "data:image/png;base64," + base64.b64encode(item["image"]).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url_}})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with limit:
            t0 = time.perf_counter()
            first, n = None, 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.perf_counter() - t0
                    if line != "data: [DONE]" and (usage := json.loads(line[6:]).get("usage")):
                        n = usage["completion_tokens"]
            total = time.perf_counter() - t0
        assert n == max_tokens, n
        ttfts.append(first)
        tpots.append((total - first) / (n - 1))
        tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, item) for item in requests))
        wall = time.perf_counter() - t0
    return {"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tpot_ms": 1e3 * float(np.mean(tpots)), "throughput_tok_s": tokens / wall, "wall_s": wall,
            "requests": len(requests)}


def measure_level(url: str, requests: list[dict], concurrency: int, max_tokens: int) -> dict:
    """run_level in the client process."""
    return asyncio.run(run_level(url, requests, concurrency, max_tokens))


def run_baseline(model_dir: Path, pipe, requests: list[dict], max_tokens: int, device: str = "cpu",
                 dtype: str = "float32") -> dict:
    """transformers generate, one request at a time (the LLaVA repo's model worker)."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    from llava_rt.image_processor import load_image, preprocess
    from llava_rt.runtime.llm import prompt_messages

    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()

    class FirstToken(BaseStreamer):  # put() gets the prompt first, then each new token
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    ttfts, tpots, tokens = [], [], 0
    t_all = time.perf_counter()
    for item in requests:
        t0 = time.perf_counter()
        prompt = {"prompt": item["question"], "image": item["image"]}
        messages, images = prompt_messages(prompt)
        ids = torch.tensor([pipe.prompt_ids(messages, len(images))], device=device)
        kw = {}
        if images:
            pixels = torch.from_numpy(preprocess([load_image(item["image"])], pipe.image_config))
            kw["pixel_values"] = pixels.to(device, getattr(torch, dtype))
        streamer = FirstToken()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0, streamer=streamer, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        n = out.shape[1] - ids.shape[1]
        assert n == max_tokens
        ttfts.append(streamer.first - t0)
        tpots.append((total - ttfts[-1]) / (n - 1))
        tokens += n
    wall = time.perf_counter() - t_all
    return {"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tpot_ms": 1e3 * float(np.mean(tpots)), "throughput_tok_s": tokens / wall, "wall_s": wall,
            "requests": len(requests)}


def plot(rows: list[dict], baseline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["throughput_tok_s"] for r in rows], "o-", label="llava-serve")
    a.axhline(baseline["throughput_tok_s"], color="gray", ls="--", label="transformers, one at a time")
    a.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="throughput")
    a.set_xticks(c, [str(x) for x in c])
    a.legend()
    b.plot(c, [r["ttft_p50_s"] for r in rows], "o-", label="TTFT p50")
    b.plot(c, [r["ttft_p99_s"] for r in rows], "s-", label="TTFT p99")
    b.axhline(baseline["ttft_p50_s"], color="gray", ls="--", label="transformers TTFT p50")
    b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="seconds", title="time to first token")
    b.set_xticks(c, [str(x) for x in c])
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: a random one of --preset)")
    p.add_argument("--preset", default="mid", choices=["tiny", "mid", "llava-1.5-7b"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both engines)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/serve-cpu-DATE.json)")
    args = p.parse_args(argv)

    from llava_rt.runtime.llm import AsyncLLM
    from llava_rt.runtime.scheduler import SchedulerConfig
    from llava_rt.runtime.server import build_app

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:  # in a child process: torch ops on this thread would give the process
            # a second OpenMP pool, and the engine thread's would stop spin-waiting (see runtime/llm.py)
            model_dir = Path(tmp) / "model"
            subprocess.run([sys.executable, "-m", "llava_rt.random_checkpoint", str(model_dir), "--preset", args.preset],
                           check=True, stdout=subprocess.DEVNULL)
        else:
            model_dir = args.model
        n_max = max(args.requests, *args.concurrency)
        llm = AsyncLLM.load(model_dir, device=args.device, dtype=args.dtype, config=SchedulerConfig(max_num_seqs=64),
                            max_queue=1024, max_num_seqs=64)
        size = llm.pipeline.engine.config.vision_config.image_size
        requests = make_requests(n_max, size)
        url, server = start_server(build_app(llm, "bench"))
        rows = []
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
            clients.submit(measure_level, url, requests[:2], 2, 4).result()  # warm-up
            for c in args.concurrency:
                llm.scheduler.image_cache.clear()
                stats = clients.submit(measure_level, url, requests[: max(args.requests, c)], c, args.max_tokens).result()
                rows.append({"concurrency": c, **stats})
                print(f"concurrency {c}: {stats['throughput_tok_s']:.1f} tok/s", flush=True)
            engine, stepwise = llm.pipeline.engine, None
            if getattr(engine, "overlap_decode", False):  # the top level again, each decode step waiting for its tokens
                c = max(args.concurrency)
                engine.overlap_decode = False  # read by the engine thread at its next step; it is idle now
                llm.scheduler.image_cache.clear()
                stepwise = {"concurrency": c, **clients.submit(
                    measure_level, url, requests[: max(args.requests, c)], c, args.max_tokens).result()}
                engine.overlap_decode = True
                print(f"concurrency {c}, decoding step by step: {stepwise['throughput_tok_s']:.1f} tok/s", flush=True)
        server.should_exit = True
        llm.shutdown(1)
        baseline = None
        if not args.no_baseline:
            baseline = run_baseline(model_dir, llm.pipeline, requests[: args.requests], args.max_tokens, args.device,
                                    args.dtype)
            for r in rows:
                r["x_baseline_throughput"] = r["throughput_tok_s"] / baseline["throughput_tok_s"]
        table = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        if baseline is not None:
            table.append({"concurrency": "transformers 1-at-a-time", **{k: round(v, 3) for k, v in baseline.items()}})
        model_name = f"{args.preset} preset" if args.model is None else f"model {args.model}"
        print(f"{model_name} max_tokens={args.max_tokens} requests/level={args.requests} "
              f"(half with an image, half text-only)")
        print_table(table, ["concurrency", "requests", "ttft_p50_s", "ttft_p99_s", "tpot_ms", "throughput_tok_s",
                            "x_baseline_throughput"])
        payload = {"preset": args.preset if args.model is None else str(args.model), "device": args.device,
                   "dtype": args.dtype, "max_tokens": args.max_tokens,
                   "requests_per_level": args.requests, "mix": "half image (distinct), half text-only; greedy, EOS ignored",
                   "rows": rows, "baseline_transformers_one_at_a_time": baseline,
                   "top_level_decoding_step_by_step": stepwise}
        path = write_json(f"serve-{args.device.split(':')[0]}", payload, args.out)
        if baseline is not None:
            png = path.with_suffix(".png")
            plot(rows, baseline, png, f"llava-serve vs transformers, {model_name}, {args.device} {args.dtype}")
            print(f"wrote {path} and {png}")
        else:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
