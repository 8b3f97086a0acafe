"""Model configuration in the llava-hf layout (config.json with vision_config / text_config).

Field names follow transformers' LlavaConfig, CLIPVisionConfig and LlamaConfig, so a config.json
written by transformers reads here and ours reads there. Keys we do not model are kept in
`extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is missing, malformed or describes a model we cannot build."""


VISION_ACTS = ("quick_gelu", "gelu")
PROJECTOR_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "relu", "silu", "linear")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")  # LLaVA-1.5 two-layer MLP; LLaVA's single linear layer


def _split_known(cls, data: dict) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


@dataclass
class VisionConfig:
    """CLIP vision transformer (ViT-L/14-336 in LLaVA-1.5)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by LLaVA; kept so the file round-trips
    model_type: str = "clip_vision_model"
    extra: dict = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **out}


@dataclass
class TextConfig:
    """Llama-family decoder (Vicuna-7B in LLaVA-1.5)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict) -> "TextConfig":
        data = dict(data)
        # transformers >= 5 keeps rope settings in `rope_parameters`; 4.x uses rope_theta/rope_scaling.
        rope = data.pop("rope_parameters", None) or {}
        scaling = data.pop("rope_scaling", None) or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ConfigError(
                f"text_config: rope type {rope_type!r} is not supported (only the default Llama RoPE); "
                "remove rope_scaling from config.json or use a model without it"
            )
        if "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "rope_theta")}
        # Both spellings, so transformers 4.x and 5.x read the same theta.
        out["rope_theta"] = self.rope_theta
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {**self.extra, **out}


@dataclass
class LlavaConfig:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False
    model_type: str = "llava"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # transformers' LlavaConfig forwards a tie flag saved in the text config.
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        self.validate()

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return list(layers) if isinstance(layers, (list, tuple)) else [layers]

    @property
    def tokens_per_image(self) -> int:
        return self.vision_config.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.text_config.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {eos}

    def validate(self) -> None:
        v, t = self.vision_config, self.text_config
        checks = [
            (v.hidden_act in VISION_ACTS, f"vision_config.hidden_act {v.hidden_act!r} is not one of {VISION_ACTS}"),
            (v.hidden_size % v.num_attention_heads == 0, "vision_config.hidden_size must divide by num_attention_heads"),
            (v.image_size % v.patch_size == 0, "vision_config.image_size must be a multiple of patch_size"),
            (t.hidden_act == "silu", f"text_config.hidden_act {t.hidden_act!r} is not supported (Llama uses silu)"),
            (
                t.num_attention_heads % t.num_key_value_heads == 0,
                "text_config.num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (t.head_dim % 2 == 0, "text_config.head_dim must be even for rotary embeddings"),
            (
                self.projector_type in PROJECTOR_TYPES,
                f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}",
            ),
            (
                self.projector_hidden_act in PROJECTOR_ACTS,
                f"projector_hidden_act {self.projector_hidden_act!r} is not one of {PROJECTOR_ACTS}",
            ),
            (
                self.vision_feature_select_strategy in ("default", "full"),
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} must be 'default' or 'full'",
            ),
            (len(self.feature_layers) > 0, "vision_feature_layer must not be an empty list"),
        ]
        n_states = v.num_hidden_layers + 1  # the embeddings output plus one per encoder layer
        for layer in self.feature_layers:
            checks.append(
                (
                    -n_states <= layer < n_states,
                    f"vision_feature_layer {layer} is out of range for {v.num_hidden_layers} vision layers",
                )
            )
        checks.append(
            (
                self.image_seq_length == self.tokens_per_image,
                f"image_seq_length {self.image_seq_length} does not match the vision tower, which gives "
                f"{self.tokens_per_image} tokens per image ((image_size/patch_size)^2"
                f"{' + CLS' if self.vision_feature_select_strategy == 'full' else ''})",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config.json: {message}")

    @classmethod
    def from_dict(cls, data: dict) -> "LlavaConfig":
        data = dict(data)
        if data.get("model_type", "llava") != "llava":
            raise ConfigError(f"config.json: model_type {data['model_type']!r} is not 'llava'")
        if "vision_config" not in data or "text_config" not in data:
            raise ConfigError("config.json: needs both 'vision_config' and 'text_config' (the llava-hf layout)")
        vision = VisionConfig.from_dict(data.pop("vision_config"))
        text = TextConfig.from_dict(data.pop("text_config"))
        if "image_token_id" in data and "image_token_index" not in data:
            data["image_token_index"] = data.pop("image_token_id")
        known, extra = _split_known(cls, data)
        try:
            return cls(vision_config=vision, text_config=text, **known, extra=extra)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    def to_dict(self) -> dict:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        out.setdefault("architectures", ["LlavaForConditionalGeneration"])
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> "LlavaConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: file not found; a model directory needs config.json (the llava-hf layout)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-export or fix the file") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {str(e).removeprefix('config.json: ')}") from None

    def save(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
