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
    """Our vision tower + a small causal text tower pooled at its last token, trained with InfoNCE.

    With `region_weight` > 0 it also aligns objects (RegionCLIP-style, with the scenes' boxes as
    the paper's teacher input has them): each object's patch features, pooled over the patches its
    box covers at `feature_layer` (the layer the projector reads), are contrasted with the text
    tower's embedding of every "size colour shape" phrase. Whole-image InfoNCE alone learns
    colour slowly and shape hardly at all: the caption of a scene can be told from the others in a
    batch by colours and counts alone.

    With `patch_weight` > 0 every patch is also contrasted on its own with the phrases, its target
    the objects whose boxes it holds (weighted by the share of each box it holds). Pooling alone
    lets an object's shape live in the pool, not in each patch (a probe reads shape at 99% from the
    pool, 84% from the best single patch), and the decoder looks up one patch at a time. Only the
    vision tower is kept.

    A second vocabulary of phrases, the 9 places ("at the top left"), teaches every patch of an
    object where the object is, in its own softmax beside the "size colour shape" one (9 + 60
    phrases where one joint softmax would need 540)."""

    def __init__(self, vision: VisionConfig, text: TextConfig, embed_dim: int, feature_layer: int = -2,
                 region_weight: float = 0.0, patch_weight: float = 0.0):
        super().__init__()
        self.vision = CLIPVisionTower(vision)
        self.text = LlamaModel(text)
        self.visual_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, embed_dim, bias=False)
        if region_weight > 0 or patch_weight > 0:
            self.region_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.n_vision_layers = vision.num_hidden_layers
        self.feature_layer, self.region_weight, self.patch_weight = feature_layer, region_weight, patch_weight

    def embed_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Right-padded and read at the last real token: causal attention is exact there without a mask.
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        hidden = self.text(self.text.embed_tokens(ids), pos)
        return F.normalize(self.text_projection(hidden[torch.arange(len(ids)), lengths - 1]), dim=-1)

    def _region_loss(self, patches: torch.Tensor, coverage: torch.Tensor, labels: torch.Tensor,
                     phrases: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The pooled and per-patch region losses of one phrase vocabulary (class docstring)."""
        present, loss = labels >= 0, 0.0
        if self.region_weight > 0:
            pooled = torch.einsum("bkp,bpd->bkd", coverage, patches)[present]
            phrase_logits = scale * F.normalize(self.region_projection(pooled), dim=-1) @ phrases.t()
            loss = loss + self.region_weight * F.cross_entropy(phrase_logits, labels[present])
        if self.patch_weight > 0:
            log_p = F.log_softmax(scale * F.normalize(self.region_projection(patches), dim=-1) @ phrases.t(), -1)
            # [B, patches, objects]: each patch's log-probability of each object's phrase
            per_object = log_p.gather(2, labels.clamp(min=0)[:, None, :].expand(-1, patches.shape[1], -1))
            weighted = (coverage.transpose(1, 2) * per_object * present[:, None, :]).sum()
            loss = loss - self.patch_weight * weighted / present.sum().clamp(min=1)
        return loss

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                regions: tuple | None = None) -> torch.Tensor:
        """regions: (coverage [B, objects, patches], then one or more phrase vocabularies, each
        (phrase index [B, objects] (-1: none), phrase ids [P, L], phrase lengths [P]))."""
        hidden = self.vision.hidden_states(pixels, upto=self.n_vision_layers)
        img = F.normalize(self.visual_projection(self.vision.post_layernorm(hidden[-1][:, 0])), dim=-1)
        txt = self.embed_text(ids, lengths)
        scale = self.logit_scale.clamp(max=np.log(100)).exp()
        logits = scale * img @ txt.t()
        target = torch.arange(len(ids), device=ids.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        if regions is not None:
            coverage, *vocabularies = regions
            patches = hidden[self.feature_layer][:, 1:]
            for labels, phrase_ids, phrase_lengths in vocabularies:
                loss = loss + self._region_loss(patches, coverage, labels, self.embed_text(phrase_ids, phrase_lengths), scale)
        return loss


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
    region_weight: float = 0.0  # the object-phrase loss (ContrastiveCLIP); needs `regions` in train_clip
    patch_weight: float = 0.0  # the same per patch, each patch against its objects' phrases
    feature_layer: int | list[int] = -2  # the projector's layer(s); the region loss pools the last one
    precision: str = "auto"
    compile: bool = False  # torch.compile the training step (trainer/loop.py)


@dataclass
class ClipRegions:
    """Object boxes for the region loss: per image the patch coverage of each object and its phrase."""
    coverage: np.ndarray  # [N, objects, patches] float, rows of absent objects zero (world.patch_coverage)
    labels: np.ndarray  # [N, objects] int, index into phrases, -1 for none
    phrases: list[list[int]]  # token ids of every "size colour shape" phrase
    place_labels: np.ndarray | None = None  # [N, objects] int, index into places, -1 for none
    places: list[list[int]] | None = None  # token ids of every place phrase ("at the top left")


def _pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ([N, longest] ids right-padded with pad_id, [N] lengths)."""
    lengths = np.array([len(c) for c in seqs])
    ids = np.full((len(seqs), lengths.max()), pad_id, dtype=np.int64)
    for i, c in enumerate(seqs):
        ids[i, : len(c)] = c
    return ids, lengths


def train_clip(pixels: np.ndarray, captions: list[list[int]], recipe: ClipRecipe, image_config: ImageProcessorConfig,
               out_dir: Path, seed: int = 0, regions: ClipRegions | None = None) -> dict:
    """Contrastive image-text training on (image, caption) pairs; saves the vision tower to out_dir/clip."""
    torch.manual_seed(seed)
    feature_layer = recipe.feature_layer if isinstance(recipe.feature_layer, int) else recipe.feature_layer[-1]
    use_regions = regions is not None and (recipe.region_weight > 0 or recipe.patch_weight > 0)
    model = ContrastiveCLIP(recipe.vision, recipe.text, recipe.embed_dim, feature_layer,
                            *((recipe.region_weight, recipe.patch_weight) if use_regions else (0.0, 0.0)))
    ids, lengths = _pad(captions)
    if use_regions:
        vocabularies = [(labels, *(torch.from_numpy(a) for a in _pad(phrases)))
                        for labels, phrases in ((regions.labels, regions.phrases), (regions.place_labels, regions.places))
                        if phrases is not None]

    def loss_fn(m, idx):
        px = torch.from_numpy(pixels[idx].astype(np.float32))
        boxes = None
        if use_regions:
            boxes = (torch.from_numpy(regions.coverage[idx]),
                     *((torch.from_numpy(labels[idx]), p_ids, p_lengths) for labels, p_ids, p_lengths in vocabularies))
        return m(px, torch.from_numpy(ids[idx]), torch.from_numpy(lengths[idx]), boxes), 1

    cfg = TrainConfig(out_dir=str(out_dir / "clip-run"), lr=recipe.lr, batch_size=recipe.batch_size,
                      micro_batch_size=recipe.batch_size, epochs=recipe.epochs, weight_decay=recipe.weight_decay,
                      seed=seed, precision=recipe.precision, compile=recipe.compile, desc="base CLIP (contrastive)")
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for right-padded ids: causal attention is exact for every real token without a mask."""
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.lm_head(self.model(self.model.embed_tokens(ids), pos))


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
    precision: str = "auto"
    extra: dict = field(default_factory=dict)


def train_llm(sequences: list[list[int]], recipe: LMRecipe, out_dir: Path, pad_id: int, seed: int = 0) -> dict:
    """Causal LM on the corpus text (each sequence <s> ... </s>); saves out_dir/llm."""
    torch.manual_seed(seed)
    model = CausalLM(recipe.text)
    ids, lengths = _pad(sequences, pad_id)

    def loss_fn(m, idx):
        width = int(lengths[idx].max())
        x = torch.from_numpy(ids[idx, :width])
        mask = (torch.arange(width)[None] < torch.from_numpy(lengths[idx])[:, None]).long()
        logits = m(x)
        labels = x.masked_fill(mask == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"), 0

    cfg = TrainConfig(out_dir=str(out_dir / "llm-run"), lr=recipe.lr, batch_size=recipe.batch_size,
                      micro_batch_size=recipe.batch_size, epochs=recipe.epochs, seed=seed,
                      precision=recipe.precision, desc="base LLM (causal LM)")
    summary = train(model, list(model.parameters()), len(sequences), loss_fn, lambda idx: int((lengths[idx] - 1).sum()),
                    cfg, save_model=lambda m, p: save_llm(m, recipe.text, p))
    save_llm(model, recipe.text, out_dir / "llm")
    return summary
