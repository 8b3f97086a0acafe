"""The data pipeline: synthetic data in the LLaVA format, reading LLaVA files, tokenizing for a stage.

Files follow the official repo: a JSON list of
    {"id", "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                           {"from": "gpt", "value": "..."}, ...]}
plus an image folder. `pretrain.json` is the stage-1 file (like LCS-558K / CC-595K), `instruct.json`
the stage-2 mix (like llava_instruct_150k.json); ours add a "type" key (conversation, detail,
reasoning) that real files lack and the reader ignores. Real LLaVA files are read the same way.

Tokenizing (the repo's `preprocess_plain` and `preprocess_v1`):
  plain (stage 1): <s><image>\\n{caption}</s>, loss on the caption and </s>;
  v1    (stage 2): the chat template ("USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ..."), loss on the
                   assistant's tokens only. The mask comes from character spans of the rendered
                   template, so it cannot drift from the tokens; a check re-decodes the labelled tokens
                   and fails loudly if they are not exactly the answers (the official repo's
                   "tokenization mismatch").
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llava_rt.tokenizer import TextProcessor

from .instructions import (BRIEF_QUESTIONS, SHORT, brief_caption, conversation, detail_question, reasoning,
                           reasoning_pass_questions, short_questions)
from .world import Scene, render, sample_scene

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
# Threads for image work (rendering, PNG coding, resizing): PIL and numpy release the GIL there, so two
# threads run it about 1.9x as fast on two cores, with the same bytes.
IMAGE_THREADS = min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- writing


def _sample(sid: str, image: str, qa: list[tuple[str, str]], kind: str, rng: random.Random) -> dict:
    turns = []
    for i, (q, a) in enumerate(qa):
        # The repo's data puts <image> first or last in the first question; the chat template puts the
        # image first either way (as the repo's preprocess_multimodal moves it to the front).
        if i == 0:
            q = f"{IMAGE_TAG}\n{q}" if rng.random() < 0.5 else f"{q}\n{IMAGE_TAG}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": sid, "image": image, "type": kind, "conversations": turns}


def generate_dataset(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Render scenes and write pretrain.json, instruct.json, eval.json, scenes.jsonl and images/."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, instruct, evaluation, scenes = [], [], [], []
    # One rng draws every scene and its questions in order (no question reads a box); rendering reads
    # only the scene (its own style seed) and fills in its boxes, so it runs in threads afterwards.
    for i in range(n_train + n_eval):
        split = "train" if i < n_train else "eval"
        scene = sample_scene(rng)
        image = f"images/{i:06d}.png"
        scenes.append(scene)
        brief = [(rng.choice(BRIEF_QUESTIONS), brief_caption(scene))]
        conv = conversation(scene, rng, turns=rng.randint(3, 5))
        detail = detail_question(scene, rng)
        reason = reasoning(scene, rng, turns=rng.randint(1, 2))
        samples = [_sample(f"{i:06d}-conversation", image, conv, "conversation", rng),
                   _sample(f"{i:06d}-detail", image, detail, "detail", rng)]
        if reason:
            samples.append(_sample(f"{i:06d}-reasoning", image, reason, "reasoning", rng))
        if split == "train":
            pretrain.append(_sample(f"{i:06d}", image, brief, "brief", rng))
            instruct.extend(samples)
        else:
            evaluation.extend(samples)
    with ThreadPoolExecutor(IMAGE_THREADS) as pool:
        jobs = pool.map(lambda i: render(scenes[i]).save(out / f"images/{i:06d}.png"), range(len(scenes)))
        for _ in tqdm(jobs, total=len(scenes), desc="rendering scenes", unit="img", leave=False):
            pass
    with open(out / "scenes.jsonl", "w") as scenes_file:
        for i, scene in enumerate(scenes):
            split = "train" if i < n_train else "eval"
            scenes_file.write(json.dumps({"id": f"{i:06d}", "split": split, "scene": scene.to_dict()}) + "\n")
    for name, data in (("pretrain.json", pretrain), ("instruct.json", instruct), ("eval.json", evaluation)):
        (out / name).write_text(json.dumps(data, indent=0))
    return out


def _write_per_training_scene(data_dir: str | Path, out_json: str | Path, seed: int, make, shuffle: bool = False) -> Path:
    """The samples `make(scene_id, scene, image, rng)` gives for each training scene (then shuffled, if
    asked), written atomically as one LLaVA JSON file; a pure function of the scenes and seed."""
    rng = random.Random(seed)
    samples = []
    with open(Path(data_dir) / "scenes.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                samples += make(row["id"], Scene.from_dict(row["scene"]), f"images/{row['id']}.png", rng)
    if shuffle:
        rng.shuffle(samples)
    return _write_atomically(Path(out_json), samples)


def _write_atomically(out: Path, samples: list[dict]) -> Path:
    """One LLaVA JSON file, never half-written: a temporary file renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(samples))
    tmp.replace(out)
    return out


def write_short_questions(data_dir: str | Path, out_json: str | Path, seed: int = 0) -> Path:
    """Single-turn conversation samples, one per question form per training scene, for stage 2's
    short-question phase (trainer/recipe.py), in the LLaVA format."""
    return _write_per_training_scene(data_dir, out_json, seed, lambda sid, scene, image, rng: [
        _sample(f"{sid}-short-{k}", image, [qa], "conversation", rng)
        for k, qa in enumerate(short_questions(scene, rng))])


def write_lookup_check(out_dir: str | Path, n_scenes: int, seed: int = 0) -> Path:
    """Scenes of their own (a seed stream apart from the data set's, so no stage trains on them), rendered
    into out_dir/images, and on each one question of every short-question form, the form's name ending the
    sample id: what the recipe checks after the short-question phase (trainer/recipe.py). Written
    atomically to out_dir/questions.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lookup-check-{seed}")
    samples = []
    for i in range(n_scenes):
        scene = sample_scene(rng)
        image = f"images/{i:05d}.png"
        render(scene).save(out / image)
        for form in SHORT:
            if (qa := form(scene, rng)) is not None:
                samples.append(_sample(f"{i:05d}-{form.__name__}", image, [qa], "conversation", rng))
    return _write_atomically(out / "questions.json", samples)


def write_reasoning_pass(data_dir: str | Path, out_json: str | Path, seed: int = 0, descriptions: bool = True) -> Path:
    """One sample per training scene of fresh reasoning and conversation questions
    (`reasoning_pass_questions`), and with `descriptions` a single-turn detailed description of the same
    scene beside it, for the reasoning pass that closes stage 2 (trainer/recipe.py). Drawn after the
    corpus is fixed, so the tokenizer and base models do not depend on it."""
    def make(sid, scene, image, rng):
        samples = [_sample(f"{sid}-pass", image, reasoning_pass_questions(scene, rng), "reasoning", rng)]
        if descriptions:
            # Without them the pass's answer words leak into descriptions asked in words no sample uses
            # ("What is in the image?"; docs/REPRODUCTION.md, "A reasoning pass").
            samples.append(_sample(f"{sid}-pass-detail", image, detail_question(scene, rng), "detail", rng))
        return samples
    return _write_per_training_scene(data_dir, out_json, seed, make, shuffle=True)


def load_scenes(data_dir: str | Path) -> dict[str, Scene]:
    scenes = {}
    with open(Path(data_dir) / "scenes.jsonl") as f:
        for line in f:
            row = json.loads(line)
            scenes[row["id"]] = Scene.from_dict(row["scene"])
    return scenes


def corpus_text(data_dir: str | Path) -> list[str]:
    """Every caption, question and answer: what the tokenizer and the base LM learn from."""
    texts = []
    for name in ("pretrain.json", "instruct.json"):
        for sample in json.loads((Path(data_dir) / name).read_text()):
            texts.extend(t["value"].replace(IMAGE_TAG, "").strip() for t in sample["conversations"])
    return texts


# ----------------------------------------------------------------------------- reading + tokenizing


@dataclass
class Example:
    id: str
    image: str | None  # path relative to the image folder
    input_ids: list[int]
    labels: list[int]
    kind: str = ""


@dataclass
class Rejected:
    id: str
    reason: str


def check_sample(sample: dict, image_folder: Path | None) -> str | None:
    """Why a LLaVA sample cannot be trained on, or None. The rules:
    turns alternate human/gpt starting with human and none is empty; a sample with an image has
    exactly one <image>, in its first human turn; one without has none; the image file exists."""
    turns = sample.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "needs a 'conversations' list with at least one human and one gpt turn"
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return f"turn {i} should come from {'human' if i % 2 == 0 else 'gpt'}"
        if not isinstance(t.get("value"), str) or not t["value"].replace(IMAGE_TAG, "").strip():
            return f"turn {i} is empty"
    if len(turns) % 2:
        return "the last turn is a question without an answer"
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if sample.get("image"):
        if n_tags != 1 or IMAGE_TAG not in turns[0]["value"]:
            return f"has an image but {n_tags} {IMAGE_TAG} tags (needs exactly one, in the first question)"
        if image_folder is not None and not (image_folder / sample["image"]).is_file():
            return f"image file {sample['image']} is missing"
    elif n_tags:
        return f"has {IMAGE_TAG} in its text but no image"
    return None


def tokenize_plain(text: TextProcessor, caption: str) -> tuple[list[int], list[int]]:
    prefix = text.encode_prompt(f"{text.image_token}\n", num_images=1)
    full = text.encode_prompt(f"{text.image_token}\n{caption}{text.eos_token}", num_images=1)
    if full[: len(prefix)] != prefix:
        raise ValueError(f"tokenization mismatch: the caption {caption!r} merged into the image prefix")
    return full, [IGNORE_INDEX] * len(prefix) + full[len(prefix) :]


def to_messages(turns: list[dict]) -> list[dict]:
    messages = []
    for i, t in enumerate(turns):
        value = t["value"]
        if i % 2 == 0:
            content = [{"type": "image"}] if IMAGE_TAG in value else []
            content.append({"type": "text", "text": value.replace(IMAGE_TAG, "").strip()})
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": value.strip()}]})
    return messages


def tokenize_v1(text: TextProcessor, turns: list[dict], sample_id: str) -> tuple[list[int], list[int]]:
    has_image = any(IMAGE_TAG in t["value"] for t in turns)
    messages = to_messages(turns)
    ids, mask = text.encode_chat(messages, add_generation_prompt=False, num_images=int(has_image),
                                 return_assistant_mask=True)
    # Label exactly what generation must produce: everything after each turn's generation prompt
    # (LLaVA's preprocess_v1 labels all of it after "ASSISTANT:"). A separator the template puts
    # before the answer (" " in "ASSISTANT: The") lies outside the {% generation %} span, yet where it
    # is a token of its own the model has to emit it first, so it is labelled too.
    for k in range(1, len(messages), 2):
        prefix = text.encode_chat(messages[:k], add_generation_prompt=True, num_images=int(has_image))
        if ids[: len(prefix)] != prefix:
            raise ValueError(f"tokenization mismatch in sample {sample_id}: turn {k} does not start where the "
                             "generation prompt ends (a token merges across the boundary)")
        j = len(prefix)
        while j < len(ids) and not mask[j]:
            mask[j] = 1
            j += 1
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    # The loud check: the labelled tokens must spell exactly the answers, each closed by </s>.
    got = text.decode([i for i in labels if i != IGNORE_INDEX], skip_special_tokens=False)
    want = "".join(t["value"].strip() + (text.eos_token or "") for t in turns[1::2])
    if got.replace(" ", "") != want.replace(" ", ""):
        raise ValueError(f"tokenization mismatch in sample {sample_id}: labels spell {got!r}, answers are {want!r}")
    return ids, labels


def load_examples(
    json_path: str | Path,
    image_folder: str | Path | None,
    text: TextProcessor,
    template: str,
    max_len: int,
    limit: int | None = None,
) -> tuple[list[Example], list[Rejected]]:
    """Read a LLaVA JSON file and tokenize it for `template` ("plain" or "v1").

    Bad samples never crash training mid-epoch: they are found here, before the first step,
    and returned as Rejected(id, reason) for the caller to report.
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a LLaVA JSON list ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    folder = Path(image_folder) if image_folder is not None else None
    examples, rejected = [], []
    for sample in tqdm(data[:limit] if limit else data, desc=f"tokenizing {path.name}", leave=False):
        sid = str(sample.get("id", "?")) if isinstance(sample, dict) else "?"
        reason = check_sample(sample, folder) if isinstance(sample, dict) else "not a JSON object"
        if reason is None:
            turns = sample["conversations"]
            if template == "plain":
                ids, labels = tokenize_plain(text, turns[1]["value"].strip())
            else:
                ids, labels = tokenize_v1(text, turns, sid)
            if len(ids) > max_len:
                reason = f"is {len(ids)} tokens, longer than the context of {max_len}"
        if reason is not None:
            rejected.append(Rejected(sid, reason))
            continue
        examples.append(Example(sid, sample.get("image"), ids, labels, sample.get("type", "")))
    return examples, rejected


def collate(batch: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays: input_ids, labels (-100 on padding), attention_mask."""
    width = max(len(e.input_ids) for e in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    labels = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
