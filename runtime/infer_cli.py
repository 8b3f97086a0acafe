"""llava-infer: answer a question about an image.

    llava-infer IMAGE "QUESTION"        stream one answer
    llava-infer IMAGE                   chat about the image, turn after turn (empty line or Ctrl-D ends)
    llava-infer --no-image "QUESTION"   a text-only question
    llava-infer --batch requests.jsonl  answer a file of requests through the batching engine

A --batch line is a JSON object: {"question": "...", "image": "photo.jpg"} (or "images": [...],
no image for text-only), optionally "id", "max_tokens", "temperature", "top_p", "top_k", "seed",
"stop". Results go to stdout as JSONL in input order; a bad line is reported on stderr and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "llava-infer"
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "llava-rt-default"


def default_model_dir() -> Path | None:
    env = os.environ.get("LLAVA_RT_MODEL")
    if env:
        return Path(env)
    candidate = REPO_MODELS / DEFAULT_MODEL_NAME
    return candidate if candidate.is_dir() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Answer questions about an image with a LLaVA model.")
    p.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...); with --no-image this is the question")
    p.add_argument("question", nargs="?", help="the question; leave out for an interactive chat")
    p.add_argument("--no-image", action="store_true", help="ask a text-only question")
    p.add_argument("--model", type=Path, help="model directory in the llava-hf layout (default: $LLAVA_RT_MODEL, else models/llava-rt-default)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                   help="inference engine; auto: onnxruntime on the CPU when MODEL/onnx (or MODEL itself) is a "
                        "matching llava-export directory, else torch")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default, reproducible)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="refuse larger images")
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, token counts and timings")
    p.add_argument("--batch", type=Path, metavar="FILE.jsonl", help="answer every request in a JSONL file, batched")
    args = p.parse_args(argv)
    if args.batch is not None:
        if args.image is not None or args.no_image:
            p.error("--batch takes the questions from its file; give no image or question")
        return args
    if args.no_image:
        if args.question is not None:
            p.error("with --no-image give only the question")
        args.question, args.image = args.image, None
        if args.question is None:
            p.error("--no-image needs a question")
    elif args.image is None:
        p.error("give an image file and a question (or --no-image with a question)")
    return args


def choose_backend(model_dir: Path, device: str, dtype: str) -> str:
    """auto: onnxruntime (no torch import: the fast start) when an export matching the checkpoint is there."""
    from .manifest import ArtifactError, find_export, read_manifest

    export = find_export(model_dir)
    if export is None or device != "cpu":
        return "torch"
    if export == model_dir:  # an export directory alone: only onnxruntime can run it
        return "onnxruntime"
    try:
        import onnxruntime  # noqa: F401

        manifest = read_manifest(export, source_dir=model_dir)
    except ImportError:
        return "torch"
    except ArtifactError as e:
        print(f"{PROG}: note: not using {export}: {e}; running the torch engine", file=sys.stderr)
        return "torch"
    export_dtype = {"fp32": "float32", "fp16": "float16"}[manifest["dtype"]]
    return "onnxruntime" if dtype in ("float32", export_dtype) else "torch"


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from llava_rt.image_processor import load_image

    from .kv_cache import CacheFullError
    from .pipeline import Pipeline, user_message
    from .sampling import SamplingParams

    if args.question is not None and not args.question.strip():
        return fail("the question is empty; ask something, e.g. llava-infer photo.jpg \"What is in the image?\"")
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        return fail(
            "no model: pass --model DIR or set LLAVA_RT_MODEL "
            "(python -m llava_rt.random_checkpoint DIR makes a small random-weight one)"
        )
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed,
        )
        images = [] if args.image is None or args.batch else [load_image(args.image, max_pixels=args.max_image_pixels)]
        backend = args.backend
        if backend == "auto":
            backend = choose_backend(Path(model_dir), args.device, args.dtype)
        if args.batch is not None:
            return run_batch(args, model_dir, backend, params)
        pipe = Pipeline.load(model_dir, backend=backend, device=args.device, dtype=args.dtype)
        if args.question is not None:
            return answer_once(pipe, images, args.question, params, args.json)
        return interactive(pipe, images, params, user_message)
    except (ValueError, OSError, CacheFullError) as e:  # our errors name the cause and the fix
        return fail(str(e))


def run_batch(args: argparse.Namespace, model_dir: Path, backend: str, defaults) -> int:
    import dataclasses

    from .llm import LLM

    lines = args.batch.read_text().splitlines()  # OSError: reported by run()
    llm = LLM(model_dir, backend=backend, device=args.device, dtype=args.dtype)
    base = args.batch.resolve().parent
    keys = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}
    accepted, bad = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("a line must be a JSON object")
            for k in ("image", "images"):  # relative paths: from the working directory, else the file's
                if k in item:
                    paths = item[k] if k == "images" else [item[k]]
                    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
                        raise ValueError(f'"{k}" must be {"a list of paths" if k == "images" else "a path"}')
                    found = [x if os.path.exists(x) else str(base / x) for x in paths]
                    item[k] = found if k == "images" else found[0]
            params = dataclasses.replace(defaults, **{keys[k]: v for k, v in item.items() if k in keys})
            stop = item.get("stop") or ()
            accepted.append((n, item.get("id"), llm.request(item, params, [stop] if isinstance(stop, str) else stop)))
        except (ValueError, TypeError, OSError) as e:  # json errors are ValueErrors too
            print(f"{PROG}: error: {args.batch} line {n}: {e}; skipped", file=sys.stderr)
            bad += 1
    outs = llm.run([r for _, _, r in accepted], use_tqdm=sys.stderr.isatty())
    for (n, rid, _), out in zip(accepted, outs):
        print(json.dumps({"line": n, "id": rid, "answer": out.text, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids)},
                         ensure_ascii=False))
    return 1 if bad else 0


def answer_once(pipe, images, question: str, params, as_json: bool) -> int:
    from .pipeline import user_message

    stream = None if as_json else (lambda piece: print(piece, end="", flush=True))
    answer = pipe.chat([user_message(question, bool(images))], images, params, on_text=stream)
    if as_json:
        print(json.dumps({
            "answer": answer.text,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": len(answer.token_ids),
            "ttft_s": round(answer.ttft_s, 4),
            "decode_tokens_per_s": round(answer.decode_tokens_per_s, 2),
            "total_s": round(answer.total_s, 4),
            "backend": pipe.engine.backend,
        }, ensure_ascii=False))
    else:
        print()
    return 0


def interactive(pipe, images, params, user_message) -> int:
    """Multi-turn chat like the LLaVA repo's CLI: the image goes with the first question."""
    messages: list[dict] = []
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            print()
            return 0
        if not question or question in ("exit", "quit"):
            return 0
        messages.append(user_message(question, bool(images) and not messages))
        print("ASSISTANT: ", end="", flush=True)
        try:
            answer = pipe.chat(messages, images, params, on_text=lambda piece: print(piece, end="", flush=True))
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            messages.pop()
            print(file=sys.stderr)
            fail(str(e))
            continue
        print()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.text}]})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
