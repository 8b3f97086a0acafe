"""llava-export: a checkpoint to a verified ONNX export directory.

    llava-export MODEL_DIR [--out DIR] [--dtype fp32|fp16] [--quantize int8|int4] [--no-verify]

The default --out is MODEL_DIR/onnx, where llava-infer looks for an export of MODEL_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "llava-export"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Export a LLaVA checkpoint to ONNX, verified against PyTorch.")
    p.add_argument("model_dir", type=Path, help="checkpoint directory (llava-hf layout)")
    p.add_argument("--out", type=Path, help="export directory (default: MODEL_DIR/onnx, found there by llava-infer)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="artifact format")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="graph precision")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the decoder (CPU)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the torch model")
    p.add_argument("--verify-pairs", type=int, default=4, help="sample image+question pairs to verify on")
    p.add_argument("--verify-tokens", type=int, default=16, help="greedy tokens per pair to verify")
    p.add_argument("--tolerance", type=float, help="override the decoder's relative logit tolerance for this dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def print_report(report: dict) -> None:
    v, d = report["vision"], report["decoder"]
    print(f"verification ({report['dtype']}, {report['pairs']} pairs x {report['new_tokens']} greedy tokens, "
          f"errors relative to max(1, max|torch|)):")
    print(f"  vision.onnx   image embeddings  max|diff| {v['max_abs_diff']:.2e}  rel {v['rel_diff']:.2e}  "
          f"(tol {report['tolerance']['vision']:.0e})  {'ok' if v['ok'] else 'DRIFTED'}")
    for mode in ("batched", "unbatched"):
        if mode in d:
            m = d[mode]
            print(f"  decoder.onnx  logits {mode:<9}  max|diff| {m['max_abs_diff']:.2e}  rel {m['rel_diff']:.2e}  "
                  f"(tol {report['tolerance']['logits']:.0e})  greedy agreement {m['greedy_agreement']:.1%}  "
                  f"identical answers {m['identical_answers']}/{report['pairs']}")
    print(f"  decoder.onnx  {'ok' if d['ok'] else 'DRIFTED'} (agreement floor {report['tolerance']['agreement']:.0%})")


def run(args: argparse.Namespace) -> int:
    from llava_rt.runtime.manifest import MANIFEST, ArtifactError, write_manifest

    from .onnx_export import export_onnx
    from .verify import TOLERANCES, verify_export

    out = args.out or args.model_dir / "onnx"
    dtype = args.quantize or args.dtype
    try:
        export_onnx(args.model_dir, out, dtype=args.dtype, quantize=args.quantize, opset=args.opset,
                    progress=not args.quiet)
    except (ValueError, OSError, ArtifactError) as e:
        return fail(str(e))
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))}; {total / 1e6:.1f} MB)")
    if args.no_verify:
        return 0
    tol = TOLERANCES[dtype]
    if args.tolerance is not None:
        tol = type(tol)(tol.vision, args.tolerance, tol.agreement)
    report = verify_export(out, args.model_dir, dtype, pairs=args.verify_pairs, new_tokens=args.verify_tokens,
                           tolerance=tol)
    print_report(report)
    manifest = json.loads((out / MANIFEST).read_text())
    write_manifest(out, {**manifest, "verification": report})
    if not report["ok"]:
        return fail(f"{' and '.join(report['drifted'])} drifted from the torch model beyond the {dtype} tolerance; "
                    "the export is kept but the runtime refuses it (see manifest.json 'verification')")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
