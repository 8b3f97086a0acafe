"""TTFT and decode tokens/s: onnxruntime fp32 / int8 / int4 vs our torch engine vs transformers generate.

    python benchmarks/bench_ort.py [--preset mid] [--new-tokens 64] [--repeats 5] [--batch 1 4]

Same protocol as bench_engine.py (whose timing functions it uses): a random checkpoint of the
preset, 1 image + --text-tokens text tokens, greedy, EOS ignored, medians of --repeats after a
warm-up. The three exports are made with llava-export's Python API in a temp dir; for int8/int4
the verifier's logit error and greedy agreement vs fp32 torch are recorded beside the timings.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from llava_rt.benchmarks.bench_engine import make_inputs, time_ours, time_transformers
from llava_rt.benchmarks.common import median, print_table, write_json
from llava_rt.config import LlavaConfig
from llava_rt.export.onnx_export import export_onnx
from llava_rt.export.verify import verify_export
from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.ort_engine import OrtEngine
from llava_rt.runtime.torch_engine import TorchEngine

VARIANTS = {"fp32": None, "int8": "int8", "int4": "int4"}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: a random one of --preset)")
    p.add_argument("--preset", default="mid", choices=["tiny", "mid", "llava-1.5-7b"])
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/ort-cpu-DATE.json)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_random_checkpoint(Path(tmp) / "model", args.preset)
        cfg = LlavaConfig.load(model_dir)
        exports, accuracy = {}, {}
        for name, quant in VARIANTS.items():
            exports[name] = export_onnx(model_dir, Path(tmp) / f"onnx-{name}", quantize=quant, progress=False)
            if quant:
                report = verify_export(exports[name], model_dir, name, pairs=2, new_tokens=16, modes=("batched",))
                accuracy[name] = {"rel_logit_diff": report["decoder"]["batched"]["rel_diff"],
                                  "greedy_agreement": report["decoder"]["batched"]["greedy_agreement"]}

        def load_transformers():
            from transformers import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

        # One side at a time, the others freed: idle onnxruntime thread pools beside torch's slow both down.
        sides = [(f"onnxruntime {name}", lambda d=d: OrtEngine(d), time_ours) for name, d in exports.items()]
        sides += [("llava-rt torch", lambda: TorchEngine.load(model_dir), time_ours),
                  ("transformers generate", load_transformers, time_transformers)]
        rows = []
        for name, load, timer in sides:
            engine = load()
            for batch in args.batch:
                ids, pixels = make_inputs(cfg, batch, args.text_tokens, seed=batch)
                timer(engine, ids, pixels, args.new_tokens)  # warm-up
                runs = [timer(engine, ids, pixels, args.new_tokens) for _ in range(args.repeats)]
                ttft = median([r[0] for r in runs])
                decode_s = median([r[1] - r[0] for r in runs])
                per_seq = (args.new_tokens - 1) / decode_s
                rows.append({"engine": name, "batch": batch, "ttft_ms": round(ttft * 1e3, 1),
                             "decode_ms_per_step": round(decode_s / (args.new_tokens - 1) * 1e3, 2),
                             "decode_tok_s_per_seq": round(per_seq, 1), "decode_tok_s_total": round(per_seq * batch, 1)})
            del engine
            gc.collect()
        for batch in args.batch:
            base = next(r for r in rows if r["batch"] == batch and r["engine"] == "transformers generate")
            for r in rows:
                if r["batch"] == batch:
                    r["decode_vs_transformers"] = round(r["decode_tok_s_per_seq"] / base["decode_tok_s_per_seq"], 2)
        print(f"preset={args.preset} text_tokens={args.text_tokens} image_tokens={cfg.image_seq_length} "
              f"new_tokens={args.new_tokens} repeats={args.repeats} (medians)")
        print_table(rows, ["engine", "batch", "ttft_ms", "decode_ms_per_step", "decode_tok_s_per_seq",
                           "decode_tok_s_total", "decode_vs_transformers"])
        print("quantized decoder vs fp32 torch (verifier, 2 pairs x 16 tokens):", accuracy)
        from importlib.metadata import version

        path = write_json("ort-cpu", {
            "preset": args.preset if args.model is None else str(args.model), "text_tokens": args.text_tokens,
            "image_tokens": cfg.image_seq_length, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "onnxruntime": version("onnxruntime"), "rows": rows, "quantized_accuracy": accuracy,
        }, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
