"""Random-weight LLaVA checkpoints in named shapes, for demos, tests and benchmarks.

    python -m llava_rt.random_checkpoint OUT_DIR [--preset tiny|mid|llava-1.5-7b] [--seed N] [--dtype float16]

The weights are random: answers are gibberish. They exist to exercise the whole path (load,
preprocess, prefill, decode, stream) and to time it in real shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import LlavaConfig, TextConfig, VisionConfig
from .image_processor import ImageProcessorConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# A little text to train the demo tokenizer on (random checkpoints have no corpus of their own).
DEMO_TEXT = [
    "USER: What is in the image? ASSISTANT: A red circle, a blue square and a green triangle.",
    "Describe the image briefly. The picture shows simple shapes on a light background.",
    "How many objects are there? There are three objects. Which one is on the left?",
    "The quick brown fox jumps over the lazy dog. Colors: red, green, blue, yellow, purple, orange.",
    "Shapes: circle, square, triangle, star, rectangle, ellipse. Positions: left, right, top, bottom, center.",
]


def preset(name: str) -> tuple[LlavaConfig, int]:
    """(config, image size) of a named shape. image_token_index is set from the tokenizer later."""
    if name == "tiny":
        vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=64)
        text = TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif name == "mid":  # a ViT-B/16-sized tower and a 12-layer, 768-wide decoder
        vision = VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, projection_dim=512)
        text = TextConfig(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=2048)
    elif name == "llava-1.5-7b":  # CLIP ViT-L/14-336 + Vicuna-7B
        vision, text = VisionConfig(), TextConfig()
    else:
        raise ValueError(f"unknown preset {name!r}; choose tiny, mid or llava-1.5-7b")
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=vision.num_patches,
                         image_token_index=text.vocab_size - 1)
    return config, vision.image_size


def make_random_checkpoint(out_dir: str | Path, preset_name: str = "tiny", seed: int = 0, std: float = 0.02,
                           dtype: str = "float32") -> Path:
    """dtype: the weights' dtype on disk and in memory while they are made (float16 halves a 7B's
    14 GB; the model is laid out on the meta device first, so nothing is allocated twice)."""
    import tempfile

    import torch

    from .checkpoint import save_checkpoint
    from .model import LlavaForConditionalGeneration, init_weights
    from .tokenizer import build_tokenizer_files

    config, image_size = preset(preset_name)
    with tempfile.TemporaryDirectory() as side:
        tok = build_tokenizer_files(side, DEMO_TEXT, vocab_size=min(config.text_config.vocab_size, 400))
        config.image_token_index = tok.image_token_id
        config.text_config.bos_token_id, config.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        config.text_config.pad_token_id = tok.pad_token_id
        ImageProcessorConfig(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ).save(side)
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        model = model.to_empty(device="cpu").to(getattr(torch, dtype))
        if config.tie_word_embeddings:  # to_empty gives each parameter its own storage
            model.lm_head.weight = model.language_model.embed_tokens.weight
        init_weights(model, seed=seed, std=std)
        return save_checkpoint(model, out_dir, copy_from=side, max_shard_bytes=2 * 1024**3)  # 2 GB: less held at once


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_rt.random_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", default="tiny", choices=["tiny", "mid", "llava-1.5-7b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    path = make_random_checkpoint(args.out_dir, args.preset, args.seed, dtype=args.dtype)
    print(f"wrote a random-weight {args.preset} checkpoint to {path}")


if __name__ == "__main__":
    main()
