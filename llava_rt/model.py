"""The one LLaVA network: CLIP vision tower -> projector -> Llama decoder.

The trainer trains it, the exporter traces it and the torch engine runs it. Parameter names
follow transformers (see checkpoint.py for the key mapping), so weights move both ways.

Attention inside the decoder runs in one of three ways, chosen by what the caller passes:
  * no cache (training, parity tests): causal SDPA over the batch, with an optional padding mask;
  * `PagedKV` (the engine): new keys/values are written into a paged cache through a slot
    mapping, and each query attends to its sequence's blocks;
  * `DenseKV` (the ONNX exporter): past keys/values come in as tensors and go out concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlavaConfig, TextConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, mask=None, is_causal=False, enable_gqa=False) -> torch.Tensor:
    """scaled_dot_product_attention, in fp32 under CPU autocast: the CPU flash kernel runs about
    2x slower in bf16 than in fp32 (torch 2.13), while the matmuls around it gain 3x from bf16."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                                  enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)


def activation(name: str):
    return {
        "quick_gelu": quick_gelu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "linear": lambda x: x,
    }[name]


# ----------------------------------------------------------------------------- vision tower


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """CLIP ViT (pre-LN). `post_layernorm` is kept for weight round trips; LLaVA never uses it."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, transformers' name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """[embeddings output, layer 1 output, ...], stopping after `upto` layers: later ones are unused."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states


class Projector(nn.Module):
    """LLaVA's linear W, or LLaVA-1.5's two-layer GELU MLP."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        in_dim = cfg.vision_config.hidden_size * len(cfg.feature_layers)
        out_dim = cfg.text_config.hidden_size
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        if cfg.projector_type == "mlp2x_gelu":
            self.act = activation(cfg.projector_hidden_act)
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        else:
            self.linear_2 = None
        self.act_name = cfg.projector_hidden_act if self.linear_2 is not None else "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(self.act(x))

    def project_into(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, use_kernels: bool) -> None:
        """out[rows] = self(x): with use_kernels, the fused Triton projector writes the rows itself."""
        from llava_rt.kernels.projector import ACTIVATIONS, fused_projector

        if use_kernels and self.act_name in ACTIVATIONS:
            l2 = self.linear_2
            fused_projector(x.to(out.dtype), self.linear_1.weight, self.linear_1.bias, None if l2 is None else l2.weight,
                            None if l2 is None else l2.bias, self.act_name, out, rows)
        else:
            out[rows] = self(x).to(out.dtype)


# ----------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # One fused kernel instead of ~7 (H200, 4096 wide: 5.4 vs 11.7 us a row, 8 vs 49 us for
            # 617 rows). It scales by the weight before rounding to x's dtype: within 1 ulp of the below.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [*positions.shape, head_dim], computed in fp32 like transformers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class PagedKV:
    """The engine's paged KV cache for one forward call.

    Caches are [num_blocks, block_size, kv_heads, head_dim] per layer. Sequence b's token at
    position p lives in block block_tables[b, p // block_size] at offset p % block_size.
    """

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [B, T] flat slot of each new token; -1 for padding
    block_tables: torch.Tensor  # [B, max_blocks] (padding entries may hold any valid block id)
    context_lens: torch.Tensor  # [B] tokens of each sequence in the cache after this step
    # The Triton path (kernels/): cos/sin tables [max_positions, head_dim // 2] fp32 from
    # kernels.rope_kv.rope_tables. Set by the engine on CUDA (tests: CPU under TRITON_INTERPRET=1).
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
    # Chunked prefill on the Triton path: each row's new-token count and first row, worked out
    # by the first layer and reused by the others.
    q_lens: torch.Tensor | None = None
    q_start: torch.Tensor | None = None
    # No sequence has cached tokens before this step (whole prompts): the Triton path's attention
    # then reads this step's keys directly with SDPA (flash attention on CUDA), which beat the paged
    # prefill kernel 19 vs 35 us at 616 tokens on an H200 (benchmarks/RESULTS.md).
    prefix_free: bool = False


@dataclass
class VisionFeatures:
    """Un-projected vision features [N, image_seq_length, projector input] that `embed` projects
    straight into the image-token rows of the embedding buffer (the fused projector kernel)."""

    features: torch.Tensor
    use_kernels: bool = True

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index) -> "VisionFeatures":
        return VisionFeatures(self.features[index], self.use_kernels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape)


@dataclass
class DenseKV:
    """Past keys/values as plain tensors [B, kv_heads, past, head_dim] per layer (ONNX export)."""

    past_k: list[torch.Tensor]
    past_v: list[torch.Tensor]
    attention_mask: torch.Tensor  # [B, past + T]: 1 for real tokens, 0 for padding
    present_k: list[torch.Tensor | None]
    present_v: list[torch.Tensor | None]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        # Set by fuse_projections: q/k/v as one matrix (buffers, so .to() moves them; not saved).
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x, cos, sin, positions, attention_mask, kv) -> torch.Tensor:
        b, t, _ = x.shape
        if isinstance(kv, PagedKV) and kv.rope_tables is not None:
            return self.o_proj(self._paged_kernels(x, positions, kv))
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(kv, PagedKV):
            out = self._paged(q, k, v, positions, kv)
        elif isinstance(kv, DenseKV):
            out = self._dense(q, k, v, kv)
        else:
            out = self._plain(q, k, v, attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _sdpa(self, q, k, v, mask=None):
        if self.num_kv_heads != self.num_heads:  # repeated, not enable_gqa: the ONNX export traces this
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        return attention(q, k, v, mask)

    def _plain(self, q, k, v, attention_mask):
        t = q.shape[2]
        if attention_mask is None:  # the trainer's right-padded batches: causal is exact for every real token
            return attention(q, k, v, is_causal=t > 1, enable_gqa=self.num_kv_heads != self.num_heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        mask = causal[None] & attention_mask.bool()[:, None, :]
        # A padded query row that sees nothing would give NaN; let it see itself.
        mask = mask | torch.eye(t, dtype=torch.bool, device=q.device)[None]
        return self._sdpa(q, k, v, mask[:, None])

    def _paged(self, q, k, v, positions, kv: PagedKV):
        k_cache, v_cache = kv.k_caches[self.layer_idx], kv.v_caches[self.layer_idx]
        num_blocks, block_size, n_kv, d = k_cache.shape
        slots = kv.slot_mapping.reshape(-1)
        keep = slots >= 0
        new_k = k.transpose(1, 2).reshape(-1, n_kv, d)[keep]
        new_v = v.transpose(1, 2).reshape(-1, n_kv, d)[keep]
        k_cache.view(-1, n_kv, d).index_copy_(0, slots[keep], new_k.to(k_cache.dtype))
        v_cache.view(-1, n_kv, d).index_copy_(0, slots[keep], new_v.to(v_cache.dtype))
        # One sequence at a time: gathering only its own blocks keeps the copy small enough to
        # stay in cache, and needs no padding; a batch-wide padded gather is ~3x slower on CPU.
        out = torch.zeros_like(q)
        t = q.shape[2]
        for i, (n, n_q) in enumerate(zip(kv.context_lens.tolist(), (slots.view(q.shape[0], t) >= 0).sum(1).tolist())):
            blocks = kv.block_tables[i, : -(-n // block_size)]
            keys = k_cache.index_select(0, blocks).view(-1, n_kv, d)[:n].transpose(0, 1).to(q.dtype)
            values = v_cache.index_select(0, blocks).view(-1, n_kv, d)[:n].transpose(0, 1).to(q.dtype)
            mask = None
            if n_q > 1:  # new tokens see the cache and each other causally
                mask = torch.arange(n, device=q.device)[None, :] <= positions[i, :n_q, None]
            # 4-D inputs take the fused CPU kernel (3-D ones fall back to the op-by-op math path)
            out[i, :, :n_q] = F.scaled_dot_product_attention(q[i : i + 1, :, :n_q], keys[None], values[None], mask,
                                                             enable_gqa=n_kv != self.num_heads)[0]
        return out

    def _paged_kernels(self, x, positions, kv: PagedKV) -> torch.Tensor:
        """The Triton path: RoPE fused with the cache write, then paged decode or chunked-prefill
        attention straight from the cache. Same result as apply_rope + _paged. [B, T, heads * D]."""
        from llava_rt.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
        from llava_rt.kernels.rope_kv import rope_kv_write

        b, t, _ = x.shape
        k_cache, v_cache = kv.k_caches[self.layer_idx], kv.v_caches[self.layer_idx]
        if self.qkv_weight is not None:
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).view(b * t, -1).split([nq, nkv, nkv], dim=-1)
            q, k, v = (y.view(b * t, -1, self.head_dim) for y in (q, k, v))
        else:
            q = self.q_proj(x).view(b * t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(b * t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(b * t, self.num_kv_heads, self.head_dim)
        cos, sin = kv.rope_tables
        whole = t > 1 and kv.prefix_free
        q = rope_kv_write(q, k, v, positions.reshape(-1), cos, sin, k_cache, v_cache, kv.slot_mapping.reshape(-1),
                          k_out=k if whole else None)
        scale = self.head_dim**-0.5
        if whole:  # padding sits after each row's tokens, so causal attention never reaches it
            q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
            return out.transpose(1, 2).reshape(b, t, -1)
        if t == 1:
            out = paged_decode_attention(q, k_cache, v_cache, kv.block_tables, kv.context_lens, scale)
        else:  # rows are padded to t; padding (slot -1) sits after each row's real tokens
            if kv.q_lens is None:
                kv.q_lens = (kv.slot_mapping >= 0).sum(1)
                kv.q_start = torch.arange(b, device=x.device) * t
            out = paged_prefill_attention(q, k_cache, v_cache, kv.block_tables, kv.q_start, kv.q_lens, kv.context_lens,
                                          scale, out=torch.zeros_like(q), max_q_len=t)
        return out.view(b, t, -1)

    def _dense(self, q, k, v, kv: DenseKV):
        keys = torch.cat([kv.past_k[self.layer_idx], k], dim=2)
        values = torch.cat([kv.past_v[self.layer_idx], v], dim=2)
        kv.present_k[self.layer_idx], kv.present_v[self.layer_idx] = keys, values
        t, total = q.shape[2], keys.shape[2]
        past = total - t
        q_pos = torch.arange(t, device=q.device)[:, None] + past
        k_pos = torch.arange(total, device=q.device)[None, :]
        mask = (k_pos <= q_pos)[None] & kv.attention_mask.bool()[:, None, :]
        mask = mask | (k_pos == q_pos)[None]  # padded rows see themselves, never NaN
        return self._sdpa(q, keys, values, mask[:, None])


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        # Set by fuse_projections: gate and up as one matrix (buffers, so .to() moves them; not saved).
        self.register_buffer("gate_up_weight", None, persistent=False)
        self.register_buffer("gate_up_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            from llava_rt.kernels import kernels_usable
            from llava_rt.kernels.swiglu import silu_mul, silu_mul_ref

            gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)
            return self.down_proj(silu_mul(gate_up) if kernels_usable(gate_up) else silu_mul_ref(gate_up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, positions, attention_mask, kv) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, attention_mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, positions, attention_mask=None, kv=None) -> torch.Tensor:
        if isinstance(kv, PagedKV) and kv.rope_tables is not None:
            return self._forward_kernels(inputs_embeds, positions, kv)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, positions, attention_mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, attention_mask, kv)
        return self.norm(x)

    def _forward_kernels(self, inputs_embeds, positions, kv: PagedKV) -> torch.Tensor:
        """The same layers on the Triton path: each residual add is fused with the RMSNorm after
        it (kernels/rmsnorm.py), and RoPE happens inside the cache write (no cos/sin here)."""
        from llava_rt.kernels.rmsnorm import add_rmsnorm

        residual = inputs_embeds.contiguous()  # the residual stream (a fresh tensor), updated in place
        delta = None  # what the last MLP adds to it
        for layer in self.layers:
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            if delta is None:
                x = add_rmsnorm(residual, None, norm1.weight, norm1.eps)
            else:
                x = add_rmsnorm(delta, residual, norm1.weight, norm1.eps)
            x = add_rmsnorm(layer.self_attn(x, None, None, positions, None, kv), residual, norm2.weight, norm2.eps)
            delta = layer.mlp(x)
        return add_rmsnorm(delta, residual, self.norm.weight, self.norm.eps)


# ----------------------------------------------------------------------------- LLaVA


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision_config)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LlamaModel(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        n_states = cfg.vision_config.num_hidden_layers + 1
        self._feature_indices = [layer % n_states for layer in cfg.feature_layers]

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projector's input: the selected vision layer(s), CLS dropped or kept."""
        states = self.vision_tower.hidden_states(pixel_values, upto=max(self._feature_indices))
        selected = [states[i] for i in self._feature_indices]
        if self.config.vision_feature_select_strategy == "default":
            selected = [s[:, 1:] for s in selected]  # drop CLS
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, image_seq_length, text hidden] embeddings for the decoder."""
        return self.multi_modal_projector(self.vision_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features spliced in, in order, at the image-token positions.

        Without image features every id is embedded as a plain token (a decode step may sample
        the image token id; transformers embeds it the same way).
        """
        embed = self.language_model.embed_tokens
        if image_features is None:
            return embed(input_ids)
        is_image = input_ids == self.config.image_token_index
        # The image token id may lie outside the embedding table; its rows are replaced anyway.
        embeds = embed(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        n_slots = int(is_image.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_slots != n_features:
            raise ValueError(
                f"the prompt has {n_slots} image-token slots but {n_features} image features were given "
                f"({self.config.image_seq_length} per image); pass one image per <image> in the prompt"
            )
        if isinstance(image_features, VisionFeatures):  # project straight into the image rows
            rows = is_image.reshape(-1).nonzero().squeeze(1)
            x = image_features.features.reshape(n_features, -1)
            self.multi_modal_projector.project_into(x, embeds.view(-1, embeds.shape[-1]), rows, image_features.use_kernels)
            return embeds
        return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv: PagedKV | DenseKV | None = None,
        image_features: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab], or [B, vocab] at `logits_index` (one position per row).

        `positions` defaults to 0..T-1; with right padding and `attention_mask` that is what
        training wants. The engine passes positions and a PagedKV. `inputs_embeds` (from `embed`)
        stands in for input_ids and the images: the engine's prefill CUDA graphs start there.
        """
        if inputs_embeds is None:
            if image_features is None and vision_features is not None:  # the trainer's cached frozen-tower output
                image_features = self.multi_modal_projector(vision_features)
            if image_features is None and pixel_values is not None:
                image_features = self.encode_images(pixel_values)
            inputs_embeds = self.embed(input_ids, image_features)
        embeds = inputs_embeds
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
        hidden = self.language_model(embeds, positions, attention_mask, kv)
        if logits_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_index]
        return self.lm_head(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum of outputs, in] matrix (and bias) for linears that read the same input. Each
    linear's parameters become views into it, so memory is not doubled and state_dict() keeps
    its names and values."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if has_bias:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


@torch.no_grad()
def fuse_projections(model: LlavaForConditionalGeneration) -> None:
    """Inference only: each decoder layer's q/k/v and gate/up projections as one GEMM each. On an
    H200 at batch 1 (LLaVA-1.5-7B shapes, fp16) q/k/v take 27 instead of 41 us and gate/up + SiLU
    48 instead of 53 us (benchmarks/bench_fusions.py). At 617 rows (a prompt) the fused gate/up
    GEMM measured slower, 204 vs 187 us with the SiLU: a per-shape choice is still to be made. The engine calls it on the
    Triton path; the fused matrices are non-persistent buffers, never saved. (A later .to() moves
    the views and the buffers apart: right values, one more copy of these weights.)"""
    for layer in model.language_model.layers:
        a, m = layer.self_attn, layer.mlp
        if a.qkv_weight is not None:  # already fused: CUDA graphs of an earlier engine may read these
            continue
        a.qkv_weight, a.qkv_bias = _fuse_linears([a.q_proj, a.k_proj, a.v_proj])
        m.gate_up_weight, m.gate_up_bias = _fuse_linears([m.gate_proj, m.up_proj])


def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights like transformers' init: normal(0, std) matrices, unit norms, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
