"""Checkpoint IO in the llava-hf layout.

A model directory holds config.json, model.safetensors (or shards plus
model.safetensors.index.json), tokenizer.json, tokenizer_config.json, the chat template and
preprocessor_config.json. Weight names come in three spellings, all read here:

    llava-hf hub / transformers save:  vision_tower.vision_model.X | vision_tower.X,
                                       language_model.model.X, language_model.lm_head.weight,
                                       multi_modal_projector.X
    transformers >= 5 module names:    model.vision_tower.X, model.language_model.X, lm_head.weight, ...
    ours (module names in model.py):   vision_tower.X, language_model.X, lm_head.weight, multi_modal_projector.X

We write the hub spelling (vision_tower.vision_model.*, language_model.model.*), which every
transformers version since LLaVA's introduction loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LlavaConfig
from .model import LlavaForConditionalGeneration

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Everything but the weights and config that a model directory may carry along.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A model directory with missing, corrupt or mismatched files."""


def to_internal_name(key: str) -> str:
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."):
        if key.startswith(prefix):
            key = key[len("model.") :]
    replacements = (
        ("vision_tower.vision_model.", "vision_tower."),
        ("language_model.model.", "language_model."),
        ("language_model.lm_head.", "lm_head."),
    )
    for old, new in replacements:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def to_hub_name(key: str) -> str:
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model.") :]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    single = model_dir / WEIGHTS_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-save the checkpoint") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing; copy it or re-save the checkpoint")
        return files
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; llava-rt reads safetensors only. "
            "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{single}: file not found (nor {INDEX_FILE}); the model directory has no weights")


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights under our module names (see the module docstring for the spellings read)."""
    model_dir = Path(model_dir)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    state[to_internal_name(key)] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is corrupt or truncated") from None
    return state


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlavaForConditionalGeneration:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found; pass --model with a llava-hf style directory")
    config = LlavaConfig.load(model_dir)
    state = load_state_dict(model_dir)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{model_dir}: weights do not match config.json: {'; '.join(parts)}. "
            "Check that config.json belongs to these weights"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{model_dir}: weight {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; config.json and the weights disagree"
            )
    # Each weight is copied once out of the file's memory map (copy=True: a parameter must not be a
    # view of a file that may be replaced under a running server) and becomes the parameter itself
    # (assign): a 7B checkpoint in fp16 needs 13.5 GB, not the 40 of an fp32 to_empty and a copy.
    model.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}, strict=False,
                          assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{model_dir}: no weights for {left[:3]}; config.json and the weights disagree")
    return model.eval()


def atomic_directory(out_dir: Path):
    """A temp directory beside out_dir; `commit` swaps it in so readers never see a half-written one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))

    def commit():
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return tmp, commit


def save_checkpoint(
    model: LlavaForConditionalGeneration,
    out_dir: str | Path,
    copy_from: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config + safetensors (sharded past max_shard_bytes), atomically.

    `copy_from`: a model directory whose tokenizer / template / preprocessor files come along.
    """
    out_dir = Path(out_dir)
    tmp, commit = atomic_directory(out_dir)
    try:
        config = model.config
        state = {}
        for name, tensor in model.state_dict().items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = tensor.detach().to("cpu")
            state[to_hub_name(name)] = (t.to(dtype) if dtype is not None else t).contiguous()
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = state[name]
            size += nbytes
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_FILE, metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=metadata)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save(tmp)
        if copy_from is not None:
            for name in SIDE_FILES:
                src = Path(copy_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
