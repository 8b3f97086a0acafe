"""The content-lookup experiments of docs/REPRODUCTION.md ("The lookup, isolated").

Single-turn questions on a recipe run's scenes, scenes [0, 10000) to train on, held-out questions
from scenes [10000, 12000) to score (exact match of the whole answer, teacher-forced).

  --forms shape-of      "What shape is the COLOR object?" alone (objects whose colour is unique in
                        their scene); the first 1,000 held-out questions are scored.
  --forms conversation  one question of every conversation form per scene (trainer/instructions.py),
                        the image first or last at random like the data set (the chat template puts
                        it first either way); 1,500 scored, by form.

What the decoder sees of the scene (--scene):
  tower         the frozen tower's layer -2 features of the rendered image (the real task);
  oracle-patch  perfect features instead: each patch holds the colour, shape and size one-hots of
                the objects over it, weighted by the share of the patch they cover;
  oracle-centre perfect object tokens: each object's one-hots only in the patch under its centre;
  text          no image: the scene's detailed description written before the question (what
                the paper's text-only teacher saw).

Two learners:
  --learner probe    a small transformer (2 layers, 128 wide, causal, the colour as a query token
                     after the 36 patch features, 3 filler tokens before the answer), shape-of on
                     tower features only: what the features allow;
  --learner decoder  the LLaVA checkpoint given by --model (its projector + LLM trained, the v1
                     template): what our decoder learns. --reinit re-initialises the LLM (and, with
                     an oracle scene, the projector, whose input is then new).

Example:

    python docs/experiments/lookup.py --run runs/default --learner decoder --batch 128 --steps 500 --reinit \\
        [--forms conversation [--only q_count_color,q_count_shape] --scene oracle-centre --warmup 30] \\
        [--save runs/lookup-first]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llava_rt.checkpoint import load_model, save_checkpoint
from llava_rt.image_processor import ImageProcessorConfig
from llava_rt.model import LlavaForConditionalGeneration, init_weights
from llava_rt.tokenizer import TextProcessor
from llava_rt.trainer.data import Example, collate, load_scenes, tokenize_v1
from llava_rt.trainer.instructions import CONVERSATION, detailed_description
from llava_rt.trainer.stages import image_features
from llava_rt.trainer.world import COLORS, SHAPES, SIZES, box_in_tower_input, patch_coverage

N_TRAIN_SCENES, N_SCENES = 10000, 12000


@dataclass(frozen=True)
class Question:
    scene: int
    question: str
    answer: str
    form: str
    image_first: bool = True
    color: int = -1  # shape-of: the colour and shape indices the probe uses
    shape: int = -1


def shape_of_questions(scenes) -> list[Question]:
    """"What shape is the COLOR object?" for every object whose colour is unique in its scene."""
    colors = list(COLORS)
    return [Question(i, f"What shape is the {o.color} object?", f"The {o.color} object is a {o.shape}.", "q_shape_of",
                     True, colors.index(o.color), SHAPES.index(o.shape))
            for i, (_, s) in enumerate(scenes) for o in s.objects
            if sum(p.color == o.color for p in s.objects) == 1]


def conversation_questions(scenes) -> list[Question]:
    """One question of every conversation form per scene (where the form has a definite answer)."""
    rng = random.Random(1)
    out = []
    for i, (_, s) in enumerate(scenes):
        for form in CONVERSATION:
            qa = form(s, rng)
            if qa:
                out.append(Question(i, qa[0], qa[1], form.__name__, rng.random() < 0.5))
    return out


def oracle_features(scene, image_size: int, patch_size: int, dim: int, centre: bool) -> torch.Tensor:
    """[patches, dim]: per patch, the colour / shape / size one-hots of the objects over it (zeros after)."""
    coverage = None if centre else patch_coverage(scene, image_size, patch_size)  # each object's share per patch
    grid = image_size // patch_size
    out = np.zeros((grid * grid, dim), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        code = np.zeros(len(COLORS) + len(SHAPES) + len(SIZES) + 1, dtype=np.float32)
        code[[list(COLORS).index(o.color), len(COLORS) + SHAPES.index(o.shape),
              len(COLORS) + len(SHAPES) + SIZES.index(o.size), -1]] = 1
        x0, y0, x1, y1 = box_in_tower_input(scene, o, image_size)
        if centre:  # only the patch under the box's centre
            col, row = (min(int((a + b) / 2 // patch_size), grid - 1) for a, b in ((x0, x1), (y0, y1)))
            out[row * grid + col, : len(code)] += code
        else:  # weighted by the share of each patch the object covers
            out[:, : len(code)] += (coverage[k] * (x1 - x0) * (y1 - y0) / patch_size**2)[:, None] * code
    return torch.from_numpy(out)


def fresh_llm(model: LlavaForConditionalGeneration, layers: int, width: int) -> LlavaForConditionalGeneration:
    """The same checkpoint with a randomly initialised projector and LLM of another shape."""
    config = copy.deepcopy(model.config)
    heads = width // 32
    config.text_config = replace(config.text_config, num_hidden_layers=layers, hidden_size=width,
                                 intermediate_size=int(width * 2.6875), num_attention_heads=heads,
                                 num_key_value_heads=max(1, heads // 2), head_dim=32)
    fresh = LlavaForConditionalGeneration(config)
    init_weights(fresh)
    fresh.vision_tower.load_state_dict(model.vision_tower.state_dict())
    return fresh


def learn_to_copy(model: LlavaForConditionalGeneration, max_steps: int, lr: float, half: int = 40) -> None:
    """Train the LLM on <s> x x (x: `half` random tokens) with the loss on the second x, until it copies."""
    params = [q for name, q in model.named_parameters() if not name.startswith("vision_tower")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, cfg = torch.Generator().manual_seed(0), model.config
    for step in range(1, max_steps + 1):
        x = torch.randint(4, cfg.text_config.vocab_size, (64, half), generator=gen)
        x[x == cfg.image_token_index] = 5
        ids = torch.cat([torch.full((64, 1), cfg.text_config.bos_token_id), x, x], 1)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(ids, vision_features=None)
        loss = F.cross_entropy(logits[:, half + 1 : -1].flatten(0, 1).float(), ids[:, half + 2 :].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"copy step {step}: loss {loss.item():.3f}", flush=True)
            if loss.item() < 0.05:
                return


class Probe(nn.Module):
    def __init__(self, feature_dim: int, n_patches: int, width: int = 128, layers: int = 2, filler: int = 3):
        super().__init__()
        self.inp = nn.Linear(feature_dim, width)
        self.patch_pos = nn.Parameter(torch.zeros(n_patches, width))
        self.query = nn.Embedding(len(COLORS), width)
        self.tail = nn.Parameter(torch.randn(1 + filler, width) * 0.5)  # query + filler positions
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, len(SHAPES))

    def forward(self, feats: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
        tail = self.tail.expand(len(color), -1, -1).clone()
        tail[:, 0] += self.query(color)
        x = torch.cat([self.inp(feats) + self.patch_pos, tail], 1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.out(self.encoder(x, mask=mask, is_causal=True)[:, -1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `llava-train recipe` run (data/, stage1/)")
    p.add_argument("--model", type=Path, help="LLaVA checkpoint for --learner decoder (default: RUN/stage1/final)")
    p.add_argument("--learner", choices=["probe", "decoder"], required=True)
    p.add_argument("--forms", choices=["shape-of", "conversation"], default="shape-of")
    p.add_argument("--only", help="with --forms conversation: keep these forms (comma-separated, e.g. "
                   "q_count_color,q_count_shape)")
    p.add_argument("--one-form-batches", action="store_true",
                   help="each step's batch drawn from one form (chosen at random), not from all of them")
    p.add_argument("--scene", choices=["tower", "oracle-patch", "oracle-centre", "text"], default="tower")
    p.add_argument("--standardize", action="store_true",
                   help="z-score each feature dimension over the training scenes (what a whitening projector init does)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000, help="0: only score --model as it is")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then a constant lr")
    p.add_argument("--cosine", action="store_true", help="after the warm-up, cosine decay to 0 at --steps (stage 2's schedule)")
    p.add_argument("--reinit", action="store_true", help="decoder: re-initialise the LLM's linear layers, N(0, 0.02)")
    p.add_argument("--llm", help="decoder: a fresh LLM of another shape instead, LAYERSxWIDTH (e.g. 8x192; "
                   "32-wide heads, GQA 2:1, MLP 2.6875x), with a fresh projector")
    p.add_argument("--copy-steps", type=int, default=0,
                   help="with --llm: first train the LLM on random token sequences written twice (batch 64, loss on "
                        "the second copy) for up to this many steps, stopping once it copies them (induction heads)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--misses", type=int, default=0, help="decoder: print this many held-out misses at the end")
    p.add_argument("--save", type=Path, help="decoder: write the trained checkpoint here (a stage-2 starting point)")
    a = p.parse_args()
    if a.learner == "probe" and (a.forms, a.scene) != ("shape-of", "tower"):
        p.error("the probe answers shape-of questions from tower features only")
    if a.llm and a.reinit:
        p.error("--llm is already freshly initialised; drop --reinit")
    if a.copy_steps and not a.llm:
        p.error("--copy-steps trains a fresh LLM; give --llm too")
    only, known = (a.only.split(",") if a.only else []), [form.__name__ for form in CONVERSATION]
    if unknown := [name for name in only if name not in known]:
        p.error(f"--only: unknown form(s) {', '.join(unknown)}; the forms are {', '.join(known)}")
    torch.manual_seed(0)
    model_dir = a.model or a.run / "stage1" / "final"
    model = load_model(model_dir)
    if a.llm:
        model = fresh_llm(model, *map(int, a.llm.split("x")))
        if a.copy_steps:
            learn_to_copy(model, a.copy_steps, a.lr)
    scenes = list(load_scenes(a.run / "data").items())[:N_SCENES]
    vision = model.config.vision_config
    if a.scene == "tower":
        feats = image_features(model, a.run / "data", [f"images/{sid}.png" for sid, _ in scenes],
                               ImageProcessorConfig.load(model_dir))
    elif a.scene.startswith("oracle"):
        feats = torch.stack([oracle_features(s, vision.image_size, vision.patch_size, vision.hidden_size,
                                             a.scene == "oracle-centre") for _, s in scenes])
    if a.standardize:
        fit = feats[:N_TRAIN_SCENES].flatten(0, 1)
        feats = (feats - fit.mean(0)) / fit.std(0)
    rows = shape_of_questions(scenes) if a.forms == "shape-of" else conversation_questions(scenes)
    if only:
        rows = [r for r in rows if r.form in only]
    train = [r for r in rows if r.scene < N_TRAIN_SCENES]
    scored = [r for r in rows if r.scene >= N_TRAIN_SCENES]
    if a.forms == "conversation":
        random.Random(2).shuffle(scored)
    scored = scored[: 1000 if a.forms == "shape-of" else 1500]

    if a.learner == "probe":
        learner = Probe(feats.shape[-1], feats.shape[1])

        def hits_of(batch):
            colors, shapes = torch.tensor([r.color for r in batch]), torch.tensor([r.shape for r in batch])
            logits = learner(feats[[r.scene for r in batch]], colors)
            return F.cross_entropy(logits, shapes), logits.argmax(1) == shapes
    else:
        learner = model.train()
        if a.reinit:
            modules = list(learner.language_model.modules())
            if a.scene.startswith("oracle"):
                modules += list(learner.multi_modal_projector.modules())
            for m in modules:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        for name, param in learner.named_parameters():
            param.requires_grad_(not name.startswith("vision_tower"))
        text = TextProcessor.load(model_dir, learner.config.image_token_index, learner.config.image_seq_length)
        tokenized = {}

        def example(r: Question) -> Example:
            if r not in tokenized:
                if a.scene == "text":
                    q = f"{detailed_description(scenes[r.scene][1])}\n{r.question}"
                else:
                    q = f"<image>\n{r.question}" if r.image_first else f"{r.question}\n<image>"
                turns = [{"from": "human", "value": q}, {"from": "gpt", "value": r.answer}]
                tokenized[r] = Example(str(r.scene), None, *tokenize_v1(text, turns, str(r.scene)))
            return tokenized[r]

        def logits_of(batch):
            """Next-token logits and labels of each question's tokens, teacher-forced."""
            arrays = {k: torch.from_numpy(v) for k, v in collate([example(r) for r in batch], 0).items()}
            image = None if a.scene == "text" else feats[[r.scene for r in batch]]
            with torch.autocast("cpu", torch.bfloat16):
                logits = learner(arrays["input_ids"], vision_features=image)
            return logits[:, :-1], arrays["labels"][:, 1:]

        def hits_of(batch):
            logits, labels = logits_of(batch)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            return loss, ((logits.argmax(-1) == labels) | (labels == -100)).all(1)

    params = [q for q in learner.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    def lr_factor(s: int) -> float:
        if a.warmup and s < a.warmup:
            return (s + 1) / a.warmup
        return 0.5 * (1 + math.cos(math.pi * (s - a.warmup) / max(1, a.steps - a.warmup))) if a.cosine else 1.0

    warm = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng, t0 = random.Random(0), time.time()
    by_form_train = defaultdict(list)
    for r in train:
        by_form_train[r.form].append(r)
    forms = sorted(by_form_train)
    print(f"{a.learner}, {a.forms}, scene {a.scene}: {len(train)} training questions, {len(scored)} scored; "
          f"batch {a.batch}, lr {a.lr}")

    def report(step, loss):  # "held-out": of lookup.py's own training split (a recipe's phase saw these scenes)
        learner.eval()
        by_form = defaultdict(list)
        with torch.no_grad():
            for i in range(0, len(scored), 100):
                for r, hit in zip(scored[i : i + 100], hits_of(scored[i : i + 100])[1].tolist()):
                    by_form[r.form].append(hit)
        learner.train()
        every = [h for v in by_form.values() for h in v]
        print(f"step {step:5d}  loss {loss:.3f}  held-out exact {sum(every) / len(every):.3f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
        if len(by_form) > 1:
            for form, v in sorted(by_form.items()):
                print(f"    {form:16s} {sum(v) / len(v):.3f}  (n={len(v)})", flush=True)

    for step in range(1, a.steps + 1):
        pool = by_form_train[rng.choice(forms)] if a.one_form_batches else train
        loss, _ = hits_of(rng.sample(pool, a.batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        warm.step()
        if step % a.eval_every == 0 or step == a.steps:
            report(step, loss.item())
    if a.steps == 0:  # score a saved checkpoint (--model) as it is
        report(0, float("nan"))
    if a.misses and a.learner == "decoder":
        learner.eval()
        misses = []
        with torch.no_grad():
            for i in range(0, len(scored), 100):
                batch = scored[i : i + 100]
                logits, labels = logits_of(batch)
                for r, pred, want in zip(batch, logits.argmax(-1), labels):
                    keep = want != -100
                    if (pred[keep] != want[keep]).any():
                        misses.append(f"MISS {r.form}: {r.question} | want {r.answer!r} | "
                                      f"got {text.decode(pred[keep].tolist())!r}")
                if len(misses) >= a.misses:
                    break
        print("\n".join(misses[: a.misses]))
    if a.save and a.learner == "decoder":
        save_checkpoint(learner, a.save, copy_from=model_dir)


if __name__ == "__main__":
    main()
