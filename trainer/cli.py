"""llava-train: reproduce both LLaVA training stages.

    llava-train recipe OUT [--preset default|smoke] [--ship models/llava-rt-default] [--no-short-phase]
    llava-train data OUT --train N --eval M
    llava-train base DATA OUT [--preset default|smoke]
    llava-train build --vision-tower DIR --llm DIR --tokenizer DIR --out DIR
    llava-train stage1|stage2 --model DIR --data FILE.json --image-folder DIR --out DIR [hyper-parameters]
    llava-train eval MODEL --data DIR
    llava-train scienceqa MODEL --problems problems.json [--image-root DIR]

Runs under torchrun for data parallelism (stage1/stage2): torchrun --nproc-per-node 2 -m llava_rt.trainer.cli stage2 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "llava-train"


def _stage_args(p: argparse.ArgumentParser, stage: int) -> None:
    from .recipe import preset

    d = getattr(preset("default"), f"stage{stage}")
    p.add_argument("--model", type=Path, required=True, help="llava-hf checkpoint to start from")
    p.add_argument("--data", type=Path, required=True, help="LLaVA JSON file")
    p.add_argument("--image-folder", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--tune-vision", action="store_true",
                   help="train the vision tower too (LLaVA-NeXT style; the paper keeps it frozen)")
    p.add_argument("--vision-lr", type=float, default=None, help="the tower's lr with --tune-vision (default: --lr)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="plain shuffled batches instead of batches of similar length")
    p.add_argument("--fresh-llm", action="store_true",
                   help="start from a freshly initialised LLM (the tower, projector and tokenizer kept)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping; 0: none")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (the paper: 0)")
    p.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="AdamW's beta2 (the paper: 0.999)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard, "
                        "one unit per transformer layer) instead of replicating them with DDP")
    _precision_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint-last if present")


def _precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast (fp32 master weights) or fp32; auto: bf16 on CUDA and on CPUs with "
                        "native bf16 (AVX512-BF16, AMX), fp32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (seconds to a minute to compile; docs/REPRODUCTION.md has the speed-up)")


def parse(argv):
    p = argparse.ArgumentParser(prog=PROG, description="Train LLaVA-style models: both stages of the paper.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recipe", help="the whole recipe: data, base models, stage 1, stage 2, eval")
    r.add_argument("out", type=Path)
    r.add_argument("--preset", default="default", choices=["default", "smoke"])
    r.add_argument("--ship", type=Path, help="copy the final model here (e.g. models/llava-rt-default)")
    r.add_argument("--feature-layer", type=int, default=None, help="ablation: vision feature layer (-1 or -2)")
    r.add_argument("--skip-stage1", action="store_true", help="ablation: no feature alignment stage")
    r.add_argument("--no-short-phase", action="store_true",
                   help="ablation: stage 2 as the paper has it, the instruction mix alone for 4 epochs, without "
                        "the short-question phase from a fresh LLM (docs/REPRODUCTION.md)")
    r.add_argument("--no-reasoning-pass", action="store_true",
                   help="ablation: end with stage 2's instruction mix, without the reasoning pass that closes it")
    r.add_argument("--stage2-types", nargs="+", choices=["conversation", "detail", "reasoning"],
                   help="ablation: train stage 2 on these instruction types only")
    r.add_argument("--seed", type=int, default=0,
                   help="every random draw: data, base models, initialisations, sample order (with --reuse, the stages' only)")
    _precision_arg(r)
    r.add_argument("--reuse", type=Path, help="ablation: take data, base models (and a matching stage 1 and "
                                                "short-question phase) from this run")
    d = sub.add_parser("data", help="render the synthetic world and write LLaVA-format data")
    d.add_argument("out", type=Path)
    d.add_argument("--train", type=int, default=8000)
    d.add_argument("--eval", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("base", help="train the tokenizer, a small CLIP and a small Llama on a data dir")
    b.add_argument("data", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--preset", default="default", choices=["default", "smoke"])
    bl = sub.add_parser("build", help="assemble CLIP + LLM + a new projector into a LLaVA checkpoint")
    bl.add_argument("--vision-tower", type=Path, required=True, help="CLIPVisionModel / CLIPModel directory")
    bl.add_argument("--llm", type=Path, required=True, help="LlamaForCausalLM directory")
    bl.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory with an <image> token")
    bl.add_argument("--out", type=Path, required=True)
    bl.add_argument("--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"])
    bl.add_argument("--feature-layer", type=int, default=-2)
    bl.add_argument("--no-pad", action="store_true", help="center-crop instead of LLaVA-1.5's pad-to-square")
    for stage in (1, 2):
        _stage_args(sub.add_parser(f"stage{stage}", help=f"train stage {stage}"), stage)
    e = sub.add_parser("eval", help="held-out accuracy per instruction type")
    e.add_argument("model", type=Path)
    e.add_argument("--data", type=Path, required=True, help="data dir with eval.json and images/")
    e.add_argument("--limit", type=int, default=None)
    s = sub.add_parser("scienceqa", help="multiple-choice accuracy on a ScienceQA problems.json")
    s.add_argument("model", type=Path)
    s.add_argument("--problems", type=Path, required=True)
    s.add_argument("--image-root", type=Path, default=None, help="folder with <id>/<image> (default: beside problems)")
    s.add_argument("--split", default="test")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--out", type=Path, default=None, help="write per-problem results here")
    return p.parse_args(argv)


def run(args) -> int:
    from .loop import init_distributed

    if args.cmd == "recipe":
        from .recipe import preset, run_recipe

        overrides = {"precision": args.precision, "compile": args.compile, "seed": args.seed}
        if args.feature_layer is not None:
            overrides["feature_layer"] = args.feature_layer
        if args.skip_stage1:
            s1 = preset(args.preset).stage1
            s1.epochs = 0.0
            overrides["stage1"] = s1
        report = run_recipe(args.out, args.preset, args.ship, reuse=args.reuse, stage2_types=args.stage2_types,
                            short_phase=not args.no_short_phase,
                            reasoning_pass=not args.no_reasoning_pass, **overrides)
        scores = {k: v for k, v in report["eval"].items() if k != "misses"}  # the misses are in OUT/report.json
        print(json.dumps({"eval": scores, "timings": {k: round(v, 1) for k, v in report["timings"].items()}}, indent=2))
    elif args.cmd == "data":
        from .data import generate_dataset

        print(f"wrote {generate_dataset(args.out, args.train, args.eval, args.seed)}")
    elif args.cmd == "base":
        from .recipe import make_base_models, preset

        r = preset(args.preset)
        print(json.dumps(make_base_models(args.data, args.out, r), indent=2))
    elif args.cmd == "build":
        from .stages import build_llava

        path = build_llava(args.vision_tower, args.llm, args.tokenizer, args.out, args.projector, args.feature_layer,
                           pad_to_square=not args.no_pad)
        print(f"wrote {path}")
    elif args.cmd in ("stage1", "stage2"):
        from .stages import StageConfig, run_stage

        sc = StageConfig(stage=int(args.cmd[-1]), lr=args.lr, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, epochs=args.epochs, max_len=args.max_len,
                         warmup_ratio=args.warmup_ratio, seed=args.seed, save_every=args.save_every,
                         gradient_checkpointing=args.gradient_checkpointing, limit=args.limit,
                         tune_vision=args.tune_vision, vision_lr=args.vision_lr, precision=args.precision,
                         compile=args.compile, fsdp=args.fsdp, group_by_length=not args.no_group_by_length,
                         fresh_llm=args.fresh_llm, max_grad_norm=args.max_grad_norm,
                         weight_decay=args.weight_decay, adam_beta2=args.adam_beta2)
        d = init_distributed()
        summary = run_stage(args.model, args.data, args.image_folder, args.out, sc, d, resume=args.resume)
        if d.main:
            print(json.dumps(summary, indent=2))
    elif args.cmd == "eval":
        from .evaluate import evaluate

        print(json.dumps(evaluate(args.model, args.data, args.data / "eval.json", args.limit), indent=2))
    elif args.cmd == "scienceqa":
        from .evaluate import evaluate_scienceqa

        report = evaluate_scienceqa(args.model, args.problems, args.image_root, args.split, args.limit)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("accuracy", "counts")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
