"""Evaluation on held-out data, and a ScienceQA-format evaluator.

Held-out instruction data (eval.json from the synthetic world):
  conversation, reasoning: exact match of the generated answer with the reference, per turn, with
      the earlier turns of the conversation given (teacher forcing), after normalising case,
      spaces and a trailing period;
  detail: the share of scene objects mentioned with the right colour and shape ("red circle"), and
      (detail_objects_placed) with the right place too ("at the top left there is a large red circle").
Conversation and reasoning scores are also broken down by question form (`by_question`: the
question with its colours, shapes, sizes and places replaced by COLOR, SHAPE, SIZE, PLACE), so a
weak skill shows (counting, shapes, places) instead of hiding in one number.

ScienceQA (problems.json in the ScienceQA release format): multiple choice, the prompt as the LLaVA
repo builds it, the answer letter parsed as its eval_science_qa.py does, accuracy by subject and
by context modality (TXT, IMG, NO) and grade band.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from llava_rt.checkpoint import load_model
from llava_rt.image_processor import load_image
from llava_rt.runtime.generate import generate
from llava_rt.runtime.pipeline import Pipeline
from llava_rt.runtime.sampling import SamplingParams

from .data import IGNORE_INDEX, IMAGE_TAG, to_messages
from .stages import StageData
from .world import COLORS, COLS, ROWS, SHAPES, SIZES, position_name


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def objects_mentioned(text: str) -> Counter:
    pattern = rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b"
    return Counter(re.findall(pattern, text.lower()))


_PLACES = sorted({position_name(r, c) for r in range(3) for c in range(3)}, key=len, reverse=True)
_PLACED = re.compile(rf"\bat the ({'|'.join(_PLACES)}) there is an? (?:(?:{'|'.join(SIZES)}) )?"
                     rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def objects_placed(text: str) -> Counter:
    """('top left', 'red', 'circle') for each "at the top left there is a large red circle"."""
    return Counter(_PLACED.findall(text.lower()))


def _share_found(want: Counter, found: Counter) -> float:
    return sum(min(n, found[k]) for k, n in want.items()) / max(1, sum(want.values()))


_FORM_WORDS = [(r"\b(?:%s)s?\b" % "|".join(words), name) for words, name in (
    (COLORS, "COLOR"), (SHAPES, "SHAPE"), (SIZES, "SIZE"), (ROWS + COLS, "PLACE"))]


def question_form(question: str) -> str:
    """'What color is the large star?' -> 'what color is the SIZE SHAPE?'"""
    form = question.replace(IMAGE_TAG, "").strip().lower()
    for pattern, name in _FORM_WORDS:
        form = re.sub(pattern, name, form)
    form = re.sub(r"\b\d+\b", "N", form)
    return re.sub(r"PLACE(?: PLACE)+", "PLACE", form)


def _answer_all(pipe: Pipeline, jobs: list[tuple[list[dict], str | None]], image_folder: Path, max_new_tokens: int,
                batch_size: int = 32) -> list[str]:
    """Greedy answers for (messages, image path or None) jobs, batched through the engine."""
    answers = []
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for i in tqdm(range(0, len(jobs), batch_size), desc="evaluating", leave=False):
        chunk = jobs[i : i + batch_size]
        requests = [pipe.prepare(messages, [load_image(image_folder / image)] if image else [], params)
                    for messages, image in chunk]
        for out in generate(pipe.engine, requests, pipe.text.eos_token_ids):
            answers.append(pipe.text.decode(out.token_ids).strip())
    return answers


def evaluate(model_dir: Path, image_folder: Path, eval_json: Path, limit: int | None = None,
             max_new_tokens: int = 96) -> dict:
    """Held-out accuracy per instruction type (see the module docstring)."""
    pipe = Pipeline.load(model_dir)
    samples = json.loads(Path(eval_json).read_text())[:limit]
    jobs, refs = [], []
    for s in samples:
        turns = s["conversations"]
        for t in range(0, len(turns), 2):
            messages = to_messages(turns[: t + 1])
            jobs.append((messages, s.get("image")))
            refs.append((s.get("type", "conversation"), turns[t + 1]["value"], s["id"], turns[t]["value"]))
    answers = _answer_all(pipe, jobs, Path(image_folder), max_new_tokens)
    scores: dict[str, list[float]] = defaultdict(list)
    by_form: dict[str, list[float]] = defaultdict(list)
    examples = defaultdict(list)
    for (kind, ref, sid, question), got in zip(refs, answers):
        if kind == "detail":
            score = _share_found(objects_mentioned(ref), objects_mentioned(got))
            scores["detail_placed"].append(_share_found(objects_placed(ref), objects_placed(got)))
        else:
            score = float(normalize(got) == normalize(ref))
        scores[kind].append(score)
        if kind != "detail":
            by_form[f"{kind}: {question_form(question)}"].append(score)
        if score < 1 and len(examples[kind]) < 5:
            examples[kind].append({"id": sid, "question": question.replace(IMAGE_TAG, "").strip(), "reference": ref,
                                   "answer": got})
    return {
        "conversation_exact_match": _mean(scores["conversation"]),
        "reasoning_exact_match": _mean(scores["reasoning"]),
        "detail_objects_named": _mean(scores["detail"]),
        "detail_objects_placed": _mean(scores["detail_placed"]),
        "counts": {k: len(v) for k, v in scores.items() if k != "detail_placed"},
        "by_question": {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(by_form.items())},
        "misses": dict(examples),
    }


def teacher_forced_by_form(model_dir: Path, data_json: Path, image_folder: Path, batch_size: int = 64) -> dict:
    """Per question form (what follows the last "-" of a sample id, as `write_lookup_check` names them), the
    share of samples whose every answer token, end of turn included, is the model's most likely next token
    given the reference before it: greedy decoding's exact match for a single-turn sample, from one forward
    pass (no generation), so the recipe can check its short-question phase in under a minute."""
    model = load_model(model_dir).eval()
    data = StageData.load(model, Path(model_dir), data_json, image_folder, stage=2)
    if data.rejected:
        raise ValueError(f"{data_json}: {len(data.rejected)} samples rejected, e.g. {data.rejected[0].id}: "
                         f"{data.rejected[0].reason}")
    hits: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for i in range(0, len(data.examples), batch_size):
            idx = list(range(i, min(i + batch_size, len(data.examples))))
            logits, labels = data.next_token_logits(model, idx)
            right = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(1)
            for j, hit in zip(idx, right.tolist()):
                hits[data.examples[j].id.rsplit("-", 1)[-1]].append(float(hit))
    return {form: {"accuracy": _mean(v), "n": len(v)} for form, v in sorted(hits.items())}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


# ----------------------------------------------------------------------------- ScienceQA

OPTIONS = ["A", "B", "C", "D", "E"]


def scienceqa_prompt(problem: dict) -> str:
    """The LLaVA repo's ScienceQA question: question, context, options, then the instruction."""
    choices = "\n".join(f"{OPTIONS[i]}. {c}" for i, c in enumerate(problem["choices"]))
    context = problem.get("hint") or ""
    text = f"{problem['question']}\n{'Context: ' + context + chr(10) if context else ''}{choices}\n"
    return text + "Answer with the option's letter from the given choices directly."


def parse_answer_letter(pred: str, n_choices: int) -> str:
    """As LLaVA's eval_science_qa.py: the bare letter, 'A. ...', or 'The answer is A.'; else FAILED."""
    options = OPTIONS[:n_choices]
    pred = pred.strip()
    if pred in options:
        return pred
    if len(pred) >= 3 and pred[0] in options and pred[1:3] == ". ":
        return pred[0]
    found = re.findall(r"The answer is ([A-Z]).", pred)
    return found[0] if len(found) == 1 else "FAILED"


def context_modality(problem: dict) -> str:
    if problem.get("image"):
        return "IMG"
    return "TXT" if problem.get("hint") else "NO"


def evaluate_scienceqa(model_dir: Path, problems_json: Path, image_root: Path | None = None, split: str | None = "test",
                       limit: int | None = None) -> dict:
    """Accuracy on a ScienceQA problems.json (dict id -> problem); images at image_root/<id>/<image>."""
    problems = json.loads(Path(problems_json).read_text())
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_json}: expected ScienceQA's problems.json (a dict of id -> problem)")
    items = [(pid, p) for pid, p in problems.items() if split is None or p.get("split", split) == split][:limit]
    pipe = Pipeline.load(model_dir)
    jobs = []
    for pid, p in items:
        image = f"{pid}/{p['image']}" if p.get("image") else None
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": scienceqa_prompt(p)}]
        jobs.append(([{"role": "user", "content": content}], image))
    answers = _answer_all(pipe, jobs, Path(image_root or Path(problems_json).parent), max_new_tokens=16)
    groups: dict[str, list[int]] = defaultdict(list)
    results = {}
    for (pid, p), text in zip(items, answers):
        letter = parse_answer_letter(text, len(p["choices"]))
        correct = int(letter == OPTIONS[p["answer"]])
        results[pid] = {"prediction": text, "parsed": letter, "correct": bool(correct)}
        groups["all"].append(correct)
        groups[f"subject:{p.get('subject', 'unknown')}"].append(correct)
        groups[f"context:{context_modality(p)}"].append(correct)
        grade = p.get("grade", "")
        if grade:
            n = int(re.sub(r"\D", "", grade) or 0)
            groups["grade:G1-6" if n <= 6 else "grade:G7-12"].append(correct)
    return {"accuracy": {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())},
            "counts": {k: len(v) for k, v in sorted(groups.items())}, "results": results}
