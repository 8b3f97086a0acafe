"""Tiny random LLaVA checkpoints for tests, built through our own model code."""

from __future__ import annotations

from pathlib import Path

from llava_rt.config import LlavaConfig, TextConfig, VisionConfig


def tiny_config(
    *,
    num_kv_heads: int = 4,
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    projector: str = "mlp2x_gelu",
    tie: bool = False,
    vocab_size: int = 300,
    image_token_index: int = 299,
    vision_act: str = "quick_gelu",
    image_size: int = 28,
    patch_size: int = 7,
    max_positions: int = 256,
) -> LlavaConfig:
    vision = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, hidden_act=vision_act, projection_dim=16,
    )
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    n_tokens = (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_index, image_seq_length=n_tokens,
        projector_type=projector, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie,
    )


def make_checkpoint(out_dir: Path, config: LlavaConfig, seed: int = 0, std: float = 0.2) -> Path:
    import torch

    from llava_rt.checkpoint import save_checkpoint
    from llava_rt.model import LlavaForConditionalGeneration, init_weights

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    init_weights(model, seed=seed, std=std)
    return save_checkpoint(model, out_dir)


def shared_image_requests(engine, pixels, keys):
    """Six prompts on two images: a 3-token system prefix, the image, then different questions."""
    import torch

    from llava_rt.runtime.generate import GenerationRequest
    from llava_rt.runtime.sampling import SamplingParams

    cfg, emb = engine.config, engine.encode_images(pixels)
    reqs = []
    for i, n_text in enumerate([5, 9, 2, 14, 7, 3]):
        text = torch.randint(3, 290, (n_text,), generator=torch.Generator().manual_seed(i)).tolist()
        ids = [1, 5, 9] + [cfg.image_token_index] * cfg.image_seq_length + text
        reqs.append(GenerationRequest(ids, emb[i % 2 : i % 2 + 1], SamplingParams(max_new_tokens=5), [keys[i % 2]]))
    return reqs
