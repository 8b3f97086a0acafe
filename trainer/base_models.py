"""Base models when no real backbone is given: a tokenizer, a small CLIP, a small Llama.

Each is saved in the Hugging Face layout of the real thing, so a real CLIP ViT-L/14 directory
(CLIPVisionModel or CLIPModel) or a real Vicuna directory (LlamaForCausalLM) can be passed to the
stages instead, by path:

    tokenizer/  tokenizer.json, tokenizer_config.json (chat template), special_tokens_map.json
    clip/       config.json (model_type clip_vision_model), model.safetensors (vision_model.*)
    llm/        config.json (model_type llama), model.safetensors (model.*, lm_head.weight)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llava_rt.checkpoint import CheckpointError, atomic_directory
from llava_rt.config import TextConfig, VisionConfig
from llava_rt.image_processor import ImageProcessorConfig
from llava_rt.model import CLIPVisionTower, LlamaModel

from .loop import TrainConfig, train


# ----------------------------------------------------------------------------- CLIP


class ContrastiveCLIP(nn.Module):
    """Our vision tower + a small causal text tower pooled at its last token, trained with InfoNCE."""

    def __init__(self, vision: VisionConfig, text: TextConfig, embed_dim: int):
        super().__init__()
        self.vision = CLIPVisionTower(vision)
        self.text = LlamaModel(text)
        self.visual_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.n_vision_layers = vision.num_hidden_layers

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cls = self.vision.hidden_states(pixels, upto=self.n_vision_layers)[-1][:, 0]
        img = F.normalize(self.visual_projection(self.vision.post_layernorm(cls)), dim=-1)
        emb = self.text.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        mask = (pos < lengths[:, None]).long()
        hidden = self.text(emb, pos, attention_mask=mask)
        txt = F.normalize(self.text_projection(hidden[torch.arange(len(ids)), lengths - 1]), dim=-1)
        logits = self.logit_scale.clamp(max=np.log(100)).exp() * img @ txt.t()
        target = torch.arange(len(ids), device=ids.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def save_hf_model(out_dir: Path, state: dict[str, torch.Tensor], config: dict, architecture: str,
                  image_config: ImageProcessorConfig | None = None) -> None:
    """model.safetensors + config.json (+ preprocessor_config.json), written atomically."""
    tmp, commit = atomic_directory(Path(out_dir))
    if image_config is not None:
        image_config.save(tmp)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}, indent=2))
    commit()


def save_vision_tower(tower: CLIPVisionTower, cfg: VisionConfig, out_dir: Path, image_config: ImageProcessorConfig) -> None:
    """The HF CLIPVisionModel layout, with the preprocessor_config.json the tower was trained with."""
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    save_hf_model(out_dir, state, cfg.to_dict(), "CLIPVisionModel", image_config)


def load_vision_tower(path: Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A CLIPVisionModel or CLIPModel directory -> (config, tower weights under our names)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: file not found; --vision-tower needs a CLIP directory in the HF layout")
    raw = json.loads(cfg_file.read_text())
    cfg = VisionConfig.from_dict(raw.get("vision_config", raw))
    cfg.model_type = "clip_vision_model"
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.startswith("vision_model."):
                    state[k[len("vision_model.") :]] = sf.get_tensor(k)
    if not state:
        raise CheckpointError(f"{path}: no vision_model.* weights in its safetensors files")
    return cfg, state


@dataclass
class ClipRecipe:
    vision: VisionConfig
    text: TextConfig
    embed_dim: int = 128
    lr: float = 1e-3
    batch_size: int = 128
    epochs: float = 4.0
    weight_decay: float = 0.1


def train_clip(pixels: np.ndarray, captions: list[list[int]], recipe: ClipRecipe, image_config: ImageProcessorConfig,
               out_dir: Path, seed: int = 0) -> dict:
    """Contrastive image-text training on (image, caption) pairs; saves the vision tower to out_dir/clip."""
    torch.manual_seed(seed)
    model = ContrastiveCLIP(recipe.vision, recipe.text, recipe.embed_dim)
    lengths = np.array([len(c) for c in captions])
    ids = np.zeros((len(captions), lengths.max()), dtype=np.int64)
    for i, c in enumerate(captions):
        ids[i, : len(c)] = c

    def loss_fn(m, idx):
        px = torch.from_numpy(pixels[idx].astype(np.float32))
        return m(px, torch.from_numpy(ids[idx]), torch.from_numpy(lengths[idx])), 1

    cfg = TrainConfig(out_dir=str(out_dir / "clip-run"), lr=recipe.lr, batch_size=recipe.batch_size,
                      micro_batch_size=recipe.batch_size, epochs=recipe.epochs, weight_decay=recipe.weight_decay,
                      seed=seed, desc="base CLIP (contrastive)")
    summary = train(model, list(model.parameters()), len(captions), loss_fn, lambda idx: 1, cfg,
                    save_model=lambda m, p: save_vision_tower(m.vision, recipe.vision, p, image_config))
    save_vision_tower(model.vision, recipe.vision, out_dir / "clip", image_config)
    return summary


# ----------------------------------------------------------------------------- LLM


class CausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.lm_head(self.model(self.model.embed_tokens(ids), pos, attention_mask=mask))


def save_llm(lm: CausalLM, cfg: TextConfig, out_dir: Path) -> None:
    state = {f"model.{k}": v for k, v in lm.model.state_dict().items()}
    state["lm_head.weight"] = lm.lm_head.weight
    save_hf_model(out_dir, state, cfg.to_dict(), "LlamaForCausalLM")


def load_llm(path: Path) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """A LlamaForCausalLM directory -> (config, weights under our LlavaForConditionalGeneration names)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: file not found; --llm needs a Llama directory in the HF layout")
    cfg = TextConfig.from_dict(json.loads(cfg_file.read_text()))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.startswith("model."):
                    state["language_model." + k[len("model.") :]] = sf.get_tensor(k)
                elif k == "lm_head.weight":
                    state[k] = sf.get_tensor(k)
    if not state:
        raise CheckpointError(f"{path}: no model.* weights in its safetensors files")
    return cfg, state


@dataclass
class LMRecipe:
    text: TextConfig
    lr: float = 2e-3
    batch_size: int = 64
    epochs: float = 1.0
    extra: dict = field(default_factory=dict)


def train_llm(sequences: list[list[int]], recipe: LMRecipe, out_dir: Path, pad_id: int, seed: int = 0) -> dict:
    """Causal LM on the corpus text (each sequence <s> ... </s>); saves out_dir/llm."""
    torch.manual_seed(seed)
    model = CausalLM(recipe.text)
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s

    def loss_fn(m, idx):
        width = int(lengths[idx].max())
        x = torch.from_numpy(ids[idx, :width])
        mask = (torch.arange(width)[None] < torch.from_numpy(lengths[idx])[:, None]).long()
        logits = m(x, mask)
        labels = x.masked_fill(mask == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"), 0

    cfg = TrainConfig(out_dir=str(out_dir / "llm-run"), lr=recipe.lr, batch_size=recipe.batch_size,
                      micro_batch_size=recipe.batch_size, epochs=recipe.epochs, seed=seed, desc="base LLM (causal LM)")
    summary = train(model, list(model.parameters()), len(sequences), loss_fn, lambda idx: int((lengths[idx] - 1).sum()),
                    cfg, save_model=lambda m, p: save_llm(m, recipe.text, p))
    save_llm(model, recipe.text, out_dir / "llm")
    return summary
