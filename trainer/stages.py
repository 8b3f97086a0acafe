"""The paper's two stages on one LlavaForConditionalGeneration.

Stage 1, feature alignment: vision tower and LLM frozen, the projector trained on the
caption instructions (plain template). Stage 2, end-to-end: vision frozen, projector and LLM
trained on the instruction data (v1 template), loss on the assistant's tokens only.

The vision tower is frozen in both stages, so its output for each image is computed once and
cached; the projector still runs in every step. This is the same computation as running the
frozen tower per step, minus the repeated work. `tune_vision` departs from the paper (as
LLaVA-NeXT and later recipes do) and trains the tower in stage 2 too; then the preprocessed
pixels are cached instead and the tower runs, with gradients, in every step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llava_rt.checkpoint import SIDE_FILES, load_model, save_checkpoint
from llava_rt.config import LlavaConfig
from llava_rt.image_processor import ImageProcessorConfig, load_image, preprocess
from llava_rt.model import LlavaForConditionalGeneration, init_weights
from llava_rt.tokenizer import TextProcessor

from .base_models import load_llm, load_vision_tower
from .data import IGNORE_INDEX, IMAGE_THREADS, collate, load_examples
from .loop import DistInfo, TrainConfig, train


def build_llava(
    vision_dir: Path,
    llm_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    projector_type: str = "mlp2x_gelu",
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    pad_to_square: bool = True,
    seed: int = 0,
) -> Path:
    """Assemble base CLIP + base LLM + a fresh projector into a llava-hf checkpoint directory.

    The tokenizer files come from tokenizer_dir, the image settings from the CLIP directory's
    preprocessor_config.json; pad_to_square is LLaVA-1.5's image_aspect_ratio="pad".
    """
    vcfg, vstate = load_vision_tower(vision_dir)
    tcfg, tstate = load_llm(llm_dir)
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    image_id = next((t["id"] for t in tok.get("added_tokens", []) if t["content"] == "<image>"), None)
    if image_id is None:
        raise ValueError(f"{tokenizer_dir}/tokenizer.json has no <image> added token; add one before training")
    n_tokens = vcfg.num_patches + (1 if strategy == "full" else 0)
    config = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id, image_seq_length=n_tokens,
                         projector_type=projector_type, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, tie_word_embeddings=tcfg.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    init_weights(model, seed=seed)
    result = model.load_state_dict({**{f"vision_tower.{k}": v for k, v in vstate.items()}, **tstate}, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.startswith("multi_modal_projector.")]
    if result.unexpected_keys or not_loaded:
        raise ValueError(
            f"base weights do not fit the LLaVA model: missing {not_loaded[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    image_config = ImageProcessorConfig.load(vision_dir)
    image_config.do_pad = pad_to_square
    with tempfile.TemporaryDirectory() as side:
        for name in SIDE_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, Path(side) / name)
        image_config.save(side)
        return save_checkpoint(model, out_dir, copy_from=side)


def preprocessed_batches(folder: Path, paths: list[str], image_config, batch: int):
    """The preprocessed pixels ([batch, 3, H, W] float32) of paths, batch by batch in order, read and resized
    in threads a few batches ahead (PIL and numpy release the GIL)."""
    def one(start: int) -> np.ndarray:
        return preprocess([load_image(Path(folder) / p) for p in paths[start : start + batch]], image_config)

    with ThreadPoolExecutor(IMAGE_THREADS) as pool:
        ahead = deque()
        for start in range(0, len(paths), batch):
            ahead.append(pool.submit(one, start))
            if len(ahead) > 2 * IMAGE_THREADS:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


# The last features image_features computed, by what they depend on: the recipe's stages (stage 1, the phase,
# stage 2, the pass) share one frozen tower and one image set, and encoding 12,000 images takes about 40 s.
_last_features: dict[tuple, torch.Tensor] = {}


def _features_key(model: LlavaForConditionalGeneration, folder: Path, paths: list[str], image_config) -> tuple:
    tower = hashlib.sha256()
    for name, t in model.vision_tower.state_dict().items():
        tower.update(name.encode())
        tower.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    files = tuple((p, (st := (Path(folder) / p).stat()).st_size, st.st_mtime_ns) for p in paths)
    return (tower.hexdigest(), tuple(model._feature_indices), model.config.vision_feature_select_strategy,
            json.dumps(asdict(image_config), sort_keys=True), str(Path(folder).resolve()), files)


def image_features(model: LlavaForConditionalGeneration, folder: Path, paths: list[str], image_config,
                   batch: int = 64) -> torch.Tensor:
    """Frozen-tower features (the projector's input) for each image, computed once: a later call with the same
    tower weights, layers, preprocessing and files returns the same tensor (treat it as read-only)."""
    key = _features_key(model, folder, paths, image_config)
    if key in _last_features:
        return _last_features[key]
    out = []
    model.eval()
    block = 16 * batch  # read a block in threads, then encode it: the tower's own threads would compete
    with torch.inference_mode(), tqdm(total=len(paths), desc="encoding images (frozen tower)", leave=False) as bar:
        for start in range(0, len(paths), block):
            for pixels in list(preprocessed_batches(folder, paths[start : start + block], image_config, batch)):
                out.append(model.vision_features(torch.from_numpy(pixels)))
                bar.update(len(pixels))
    _last_features.clear()  # one entry: a run's stages share one tower and one image set
    _last_features[key] = torch.cat(out)
    return _last_features[key]


def image_pixels(folder: Path, paths: list[str], image_config, batch: int = 256) -> torch.Tensor:
    """Preprocessed pixels of each image (fp16 to halve the cache), for a tower that is trained."""
    return torch.cat([torch.from_numpy(x) for x in tqdm(preprocessed_batches(folder, paths, image_config, batch),
                                                       total=-(-len(paths) // batch), desc="preprocessing images",
                                                       leave=False)]).half()


@dataclass
class StageData:
    """A stage's tokenized samples and, per image, the cached frozen-tower features (or, when the
    tower is trained, the preprocessed pixels)."""

    examples: list
    rejected: list
    images: torch.Tensor | None
    slot: dict[str, int]
    pad_id: int
    pixels: bool = False

    @classmethod
    def load(cls, model, model_dir: Path, data_json: Path, image_folder: Path, stage: int, max_len: int = 512,
             limit: int | None = None, device=torch.device("cpu"), tune_vision: bool = False) -> "StageData":
        config = model.config
        text = TextProcessor.load(model_dir, config.image_token_index, config.image_seq_length)
        template = "plain" if stage == 1 else "v1"
        examples, rejected = load_examples(data_json, image_folder, text, template, max_len, limit)
        paths = sorted({e.image for e in examples if e.image})
        images = None
        if paths:
            image_config = ImageProcessorConfig.load(model_dir)
            encode = image_pixels if tune_vision else lambda *a: image_features(model, *a)
            images = encode(Path(image_folder), paths, image_config).to(device)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        return cls(examples, rejected, images, {p: i for i, p in enumerate(paths)}, pad, tune_vision)

    def next_token_logits(self, model, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for each next token of examples idx, and its label (-100: not scored), both [batch, length - 1]."""
        batch = [self.examples[i] for i in idx]
        device = next(model.parameters()).device
        arrays = {k: torch.from_numpy(v).to(device) for k, v in collate(batch, self.pad_id).items()}
        with_image = [self.slot[e.image] for e in batch if e.image]
        images = self.images[with_image] if with_image else None
        # No attention mask: collate pads on the right, so causal attention alone is exact for every
        # labelled token (padding only ever attends, unlabelled), and it takes the faster unmasked kernel.
        if self.pixels:
            logits = model(arrays["input_ids"], pixel_values=None if images is None else images.float())
        else:
            logits = model(arrays["input_ids"], vision_features=images)
        return logits[:, :-1], arrays["labels"][:, 1:]

    def loss(self, model, idx, per_sample: bool = False) -> torch.Tensor:
        """Summed cross-entropy over the labelled tokens of examples idx; per_sample: the sum over the
        examples of each one's mean over its labelled tokens."""
        logits, labels = self.next_token_logits(model, idx)
        token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view(labels.shape)
        if per_sample:
            return (token.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)).sum()
        return token.sum()


def scored_tokens(example) -> int:
    """How many of an example's tokens the loss scores: the labelled ones, each predicted from the one before."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def mean_loss(model_dir: Path, data_json: Path, image_folder: Path, stage: int, limit: int | None = None,
              batch_size: int = 16) -> float:
    """Per-token loss of a checkpoint on a LLaVA file, with the stage's template (ablations, tests)."""
    model = load_model(model_dir).eval()
    data = StageData.load(model, model_dir, data_json, image_folder, stage, limit=limit)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(data.examples), batch_size):
            idx = list(range(i, min(i + batch_size, len(data.examples))))
            total += data.loss(model, idx).item()
            count += sum(scored_tokens(data.examples[j]) for j in idx)
    return total / max(1, count)


@dataclass
class StageConfig:
    stage: int  # 1 or 2
    lr: float
    batch_size: int
    micro_batch_size: int
    epochs: float
    max_len: int = 512
    warmup_ratio: float = 0.03
    seed: int = 0
    save_every: int = 0
    gradient_checkpointing: bool = False
    limit: int | None = None  # use only the first N samples (smoke runs)
    tune_vision: bool = False  # train the vision tower too (not the paper's setting; see the module doc)
    vision_lr: float | None = None  # the tower's lr when tuned (None: lr); LLaVA-NeXT uses lr / 5
    stop_after: int = 0
    precision: str = "auto"  # bf16 autocast on CUDA and on CPUs with native bf16 (trainer/loop.py)
    compile: bool = False  # torch.compile the training step (trainer/loop.py)
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard) instead of DDP (trainer/loop.py)
    # Batches of similar length (LLaVA's group_by_length). Off for the short-question phase: there a
    # length is nearly a question form, and batches of one form teach nothing (docs/REPRODUCTION.md).
    # Micro-batches are cut from a batch sorted by length either way (trainer/loop.py).
    group_by_length: bool = True
    # Start from a freshly initialised LLM (the tower, stage 1's projector and the tokenizer kept): from
    # our small base LM a short-question phase leaves the short answers at their most common value; from
    # a fresh one it learns them, though not every one in every seed (docs/REPRODUCTION.md, "A
    # short-question phase" and "Three seeds").
    fresh_llm: bool = False
    max_grad_norm: float = 1.0  # gradient clipping (LLaVA's 1.0); 0: none
    weight_decay: float = 0.0  # AdamW's decoupled decay (the paper: none)
    adam_beta2: float = 0.999  # AdamW's second-moment decay (the paper's; 0.95 is usual from scratch)
    log_every: int = 10  # steps between lines of metrics.jsonl
    # "token": the loss is a mean over a batch's answer tokens (the LLaVA repo's); "sample": each sample's
    # own token mean, then the mean over samples, so a long answer weighs no more than a short one.
    loss_mean: str = "token"


def run_stage(
    model_dir: Path,
    data_json: Path,
    image_folder: Path,
    out_dir: Path,
    sc: StageConfig,
    dist_info: DistInfo | None = None,
    resume: bool = False,
    log=print,
) -> dict:
    """Train one stage from model_dir; the result goes to out_dir/final (llava-hf layout)."""
    if sc.loss_mean not in ("token", "sample"):
        raise ValueError(f"loss_mean {sc.loss_mean!r}: choose token or sample")
    d = dist_info or DistInfo()
    out_dir = Path(out_dir)
    last = out_dir / "checkpoint-last"
    resume_from = last if resume and (last / "trainer_state.json").is_file() else None
    source = resume_from / "model" if resume_from else Path(model_dir)
    model = load_model(source).to(d.device).train()
    if sc.fresh_llm and resume_from is None:
        # One seed for each part: an untied head starts equal to the embeddings, as a tied one would.
        for part in (model.language_model, model.lm_head):
            init_weights(part, seed=sc.seed)
    data = StageData.load(model, model_dir, data_json, image_folder, sc.stage, sc.max_len, sc.limit, d.device,
                          sc.tune_vision)
    examples, rejected = data.examples, data.rejected
    if d.main:
        for r in rejected[:20]:
            log(f"skipping sample {r.id}: {r.reason}")
        if len(rejected) > 20:
            log(f"... and {len(rejected) - 20} more rejected samples")
        log(f"stage {sc.stage}: {len(examples)} samples ({len(rejected)} rejected) from {data_json}")
    if not examples:
        raise ValueError(f"{data_json}: no usable samples")
    n_labels = np.array([scored_tokens(e) for e in examples])

    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(model.multi_modal_projector.parameters())
    if sc.stage == 2:
        trainable += list(model.language_model.parameters()) + list(model.lm_head.parameters())
    trainable = list({id(p): p for p in trainable}.values())  # a tied head appears twice
    vision = list(model.vision_tower.parameters()) if sc.tune_vision else []
    for p in trainable + vision:
        p.requires_grad_(True)
    groups = [{"params": trainable}]
    if vision:
        groups.append({"params": vision, "lr": sc.lr if sc.vision_lr is None else sc.vision_lr})
    model.language_model.gradient_checkpointing = sc.gradient_checkpointing

    per_sample = sc.loss_mean == "sample"

    def loss_fn(m, idx):
        return data.loss(m, idx, per_sample), 0

    def save(m, path):
        save_checkpoint(m, path, copy_from=model_dir)

    cfg = TrainConfig(out_dir=str(out_dir), lr=sc.lr, batch_size=sc.batch_size, micro_batch_size=sc.micro_batch_size,
                      epochs=sc.epochs, warmup_ratio=sc.warmup_ratio, seed=sc.seed, save_every=sc.save_every,
                      gradient_checkpointing=sc.gradient_checkpointing, stop_after=sc.stop_after,
                      precision=sc.precision, compile=sc.compile, fsdp=sc.fsdp, max_grad_norm=sc.max_grad_norm,
                      weight_decay=sc.weight_decay, adam_beta2=sc.adam_beta2, group_by_length=sc.group_by_length,
                      log_every=sc.log_every,
                      desc=f"stage {sc.stage} ({'projector' if sc.stage == 1 else 'projector + LLM'}"
                           f"{' + vision' if sc.tune_vision else ''})")
    lengths = np.array([len(e.input_ids) for e in examples])
    count = (lambda idx: len(idx)) if per_sample else (lambda idx: int(n_labels[idx].sum()))
    summary = train(model, groups, len(examples), loss_fn, count, cfg, save, d,
                    resume_from, lengths=lengths, final_dir=out_dir / "final")
    summary.update(samples=len(examples), rejected=len(rejected), trainable_params=sum(p.numel() for p in trainable + vision))
    return summary
