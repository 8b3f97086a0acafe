"""The two graphs llava-export traces, as thin modules over our one model definition.

    vision   pixel_values [images, 3, H, W] float32 -> image_embeds [images, image_seq_length, hidden]
             (vision tower, feature layer selection, CLS handling and the projector, all in the graph)
    decoder  inputs_embeds [batch, seq, hidden], attention_mask [batch, past + seq] (1 real, 0 padding),
             position_ids [batch, seq], logits_index [batch],
             past_key.{i} / past_value.{i} [batch, kv_heads, past, head_dim]
             -> logits [batch, vocab] at logits_index,
                new_key.{i} / new_value.{i} [batch, kv_heads, seq, head_dim]

The decoder gives back only the new positions' keys and values (not past + new): the runtime
appends them to the cache it owns instead of copying the whole past back out every step. The
token embedding (and the splice of image embeddings at the image-token slots) happens in the
runtime from embed_tokens.npy, so prefill and decode are one graph and text-only requests need
no vision graph. The same graph serves prefill (past = 0), chunked prefill and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_rt.model import DenseKV, LlavaForConditionalGeneration


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64
    shape: list  # ints, or names of dynamic dims

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


class VisionGraph(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class DecoderGraph(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration):
        super().__init__()
        self.model = model
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, past):
        n = self.num_layers
        kv = DenseKV([p[0] for p in past], [p[1] for p in past], attention_mask, [None] * n, [None] * n)
        hidden = self.model.language_model(inputs_embeds, position_ids, None, kv)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # [B, 1, H] keeps the head a MatMul (not a Gemm), which the int4/int8 quantizer handles.
        last = hidden[rows, logits_index][:, None]
        logits = self.model.lm_head(last)[:, 0]
        past_len = past[0][0].shape[2]
        new = []
        for i in range(n):
            new += [kv.present_k[i][:, :, past_len:], kv.present_v[i][:, :, past_len:]]
        return (logits, *new)


def vision_io(model: LlavaForConditionalGeneration, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = model.config
    v = cfg.vision_config
    inputs = [TensorSpec("pixel_values", "float32", ["images", v.num_channels, v.image_size, v.image_size])]
    outputs = [TensorSpec("image_embeds", dtype, ["images", cfg.image_seq_length, cfg.text_config.hidden_size])]
    return inputs, outputs


def decoder_io(model: LlavaForConditionalGeneration, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    t = model.config.text_config
    inputs = [
        TensorSpec("inputs_embeds", dtype, ["batch", "seq", t.hidden_size]),
        TensorSpec("attention_mask", "int64", ["batch", "total"]),
        TensorSpec("position_ids", "int64", ["batch", "seq"]),
        TensorSpec("logits_index", "int64", ["batch"]),
    ]
    outputs = [TensorSpec("logits", dtype, ["batch", t.vocab_size])]
    for i in range(t.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_{kind}.{i}", dtype, ["batch", t.num_key_value_heads, "past", t.head_dim]))
            outputs.append(TensorSpec(f"new_{kind}.{i}", dtype, ["batch", t.num_key_value_heads, "seq", t.head_dim]))
    return inputs, outputs


def vision_example(model: LlavaForConditionalGeneration) -> tuple:
    v = model.config.vision_config
    return (torch.randn(2, v.num_channels, v.image_size, v.image_size),)


def decoder_example(model: LlavaForConditionalGeneration, dtype: torch.dtype) -> tuple:
    """Sizes differ per dynamic dim (batch 2, seq 3, past 4) so the tracer keeps them apart."""
    t = model.config.text_config
    b, s, p = 2, 3, 4
    past = [
        tuple(torch.randn(b, t.num_key_value_heads, p, t.head_dim, dtype=dtype) for _ in range(2))
        for _ in range(t.num_hidden_layers)
    ]
    positions = torch.arange(p, p + s).expand(b, -1).contiguous()
    return (torch.randn(b, s, t.hidden_size, dtype=dtype), torch.ones(b, p + s, dtype=torch.int64), positions,
            torch.full((b,), s - 1, dtype=torch.int64), past)


def decoder_dynamic_shapes(model: LlavaForConditionalGeneration) -> tuple:
    dyn = torch.export.Dim.DYNAMIC
    n = model.config.text_config.num_hidden_layers
    return ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn}, [({0: dyn, 2: dyn},) * 2 for _ in range(n)])
