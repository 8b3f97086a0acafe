"""Cold start of one answer, process start to exit after the last token: llava-infer on onnxruntime,
llava-infer on the torch engine, and the equivalent transformers script.

    python benchmarks/bench_cold_start.py [--model DIR] [--new-tokens 24] [--repeats 5]

Model: models/llava-rt-default when it exists, else a random `tiny` checkpoint made in a temp
dir (the table says which); its ONNX export is made in MODEL/onnx if missing. Each command is a
fresh process, timed from spawn to exit; one warm-up run first so every side reads files from a
warm page cache. All three answer the same image + question greedily with the same token budget.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llava_rt.benchmarks.common import median, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "shapes.png"
QUESTION = "What is in the image?"

TRANSFORMERS_SCRIPT = """
import sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model_dir, image, question, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
c = model.config
processor = AutoProcessor.from_pretrained(model_dir, patch_size=c.vision_config.patch_size, num_additional_image_tokens=1,
                                          vision_feature_select_strategy=c.vision_feature_select_strategy)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def llava_infer() -> list[str]:
    script = Path(sys.executable).parent / "llava-infer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llava_rt.runtime.infer_cli"]


def time_command(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return elapsed, proc.stdout.strip()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: models/llava-rt-default, else random tiny)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/cold-start-cpu-DATE.json)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or ROOT / "models" / "llava-rt-default"
        which = str(model_dir)
        if not model_dir.is_dir():
            from llava_rt.random_checkpoint import make_random_checkpoint

            model_dir, which = make_random_checkpoint(Path(tmp) / "tiny", "tiny"), "random tiny preset"
        if not (model_dir / "onnx" / "manifest.json").is_file():
            from llava_rt.export.onnx_export import export_onnx

            export_onnx(model_dir, model_dir / "onnx", progress=False)
        common = [str(IMAGE), QUESTION, "--max-new-tokens", str(args.new_tokens)]
        sides = {
            "llava-infer onnxruntime": llava_infer() + ["--model", str(model_dir), "--backend", "onnxruntime", *common],
            "llava-infer torch": llava_infer() + ["--model", str(model_dir), "--backend", "torch", *common],
            "transformers script": [sys.executable, "-c", TRANSFORMERS_SCRIPT, str(model_dir), str(IMAGE), QUESTION,
                                    str(args.new_tokens)],
        }
        rows = []
        for name, cmd in sides.items():
            _, answer = time_command(cmd)  # warm-up: page cache, .pyc files
            times = [time_command(cmd)[0] for _ in range(args.repeats)]
            rows.append({"command": name, "median_s": round(median(times), 3), "min_s": round(min(times), 3),
                         "max_s": round(max(times), 3), "answer": answer[:40]})
        print(f"model: {which}; {args.new_tokens} new tokens, greedy; process spawn to exit; {args.repeats} runs each")
        print_table(rows, ["command", "median_s", "min_s", "max_s", "answer"])
        path = write_json("cold-start-cpu", {"model": which, "new_tokens": args.new_tokens, "repeats": args.repeats,
                                             "question": QUESTION, "image": IMAGE.name, "rows": rows}, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
