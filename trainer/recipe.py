"""The documented recipes: data -> tokenizer -> base CLIP -> base LLM -> stage 1 -> stage 2 -> eval.

`default` makes the shipped model (models/llava-rt-default); `smoke` is the same path on tiny
data for CI. Hyper-parameters are the paper's where they carry over, scaled for a model of a
few million parameters trained from scratch on a 2-core CPU:

    paper stage 1: lr 2e-3, batch 128, 1 epoch          -> lr 2e-3, batch 64, 1 epoch
    paper stage 2: lr 2e-5, batch 32, 3 epochs          -> the short-question phase below, then lr 1e-3,
                                                           batch 32, 2 epochs (3 samples per image), then
                                                           the reasoning pass below (lr 2e-4, 1 epoch)
    both: Adam(W) without weight decay, cosine schedule, 3% warm-up (kept)

Stage 2 opens (no paper counterpart) with a short-question phase: single-turn questions, one of
each conversation form per training image, in batches of 128, from a freshly initialised LLM (stage 1's
projector kept), 3 epochs without gradient clipping and with AdamW's beta2 at 0.95, as transformers
trained from scratch usually are; then the instruction mix for 2 epochs instead of 4.
Our small LLM, unlike the paper's Vicuna, cannot yet read an answer out of the image tokens, and
in the mix the short answers stayed at their most common value; docs/REPRODUCTION.md, "A
short-question phase". `--no-short-phase` gives the paper's plain stage 2 (4 epochs).

Whether the phase's lookups left their plateau is a draw of the seed, the data and even the CPU's
rounding (docs/REPRODUCTION.md, "Three seeds" and "The same command on another CPU"), so the recipe checks:
after the phase, one question of each form on 300 scenes of their own, teacher-forced (greedy exact match
from one forward pass, under a minute), and while a form scores below 75% the phase gets one more
epoch with the learning rate warmed up again, at most twice. A draw still stuck after them is drawn again:
stage 1 and the phase on the next seed, checked the same way, and stage 2 starts from the draw whose check
ended best. A draw that broke out pays only the check.

Stage 2 closes (no paper counterpart either) with a reasoning pass: from stage 2's model, per training
image one sample of fresh draws of the same question forms, three or four reasoning questions and two
conversation questions in a random order, and beside it the image's detailed description as a sample of
its own, 1 epoch at lr 2e-4. LLaVA-Instruct-158K is half complex reasoning; our mix has one reasoning
sample of one or two questions per image, and the reasoning answers, which count before they conclude,
went wrong on the counts (docs/REPRODUCTION.md, "A reasoning pass"). Without the descriptions the pass's
answer words leaked into descriptions asked in untaught words ("What is in the image?"). The pass's
questions are drawn beside the data set, not into it, so the tokenizer, the base models and both stages
are the same with or without it. `--no-reasoning-pass` leaves it out.

Stage 2's learning rate is higher than the paper's 2e-5 because our LLM is tiny and was
pretrained on little text; 2e-5 is tuned for fine-tuning a 7B Vicuna that already speaks well.

The base CLIP (no paper counterpart: the paper starts from OpenAI's) adds region losses to
InfoNCE: each object's box-pooled patches, and each patch under it, against its "size colour
shape" phrase and, in a second softmax, its place phrase ("at the top left"). Without the first
the frozen tower hardly encodes shape; without the second the projector drops where an object is,
and the decoder answered "where" at about chance (docs/REPRODUCTION.md has the probes).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from llava_rt.config import TextConfig, VisionConfig
from llava_rt.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessorConfig
from llava_rt.tokenizer import TextProcessor, build_tokenizer_files

from .base_models import ClipRecipe, ClipRegions, LMRecipe, train_clip, train_llm
from .data import (corpus_text, generate_dataset, load_scenes, write_lookup_check, write_reasoning_pass,
                   write_short_questions)
from .instructions import at_position, describe, detailed_description
from .world import COLORS, COLS, MAX_OBJECTS, ROWS, SHAPES, SIZES, SceneObject, patch_coverage, position_name
from .stages import StageConfig, build_llava, image_pixels, run_stage


@dataclass
class Recipe:
    n_train: int
    n_eval: int
    vocab_size: int
    image_size: int
    vision: VisionConfig
    text: TextConfig
    clip_epochs: float
    clip_batch: int
    clip_lr: float
    clip_region_weight: float  # the object-phrase loss of the base CLIP (0: image-caption InfoNCE only)
    clip_patch_weight: float  # the same loss per patch (trainer/base_models.py)
    lm_epochs: float
    stage1: StageConfig
    stage2: StageConfig
    projector_type: str = "mlp2x_gelu"
    feature_layer: int | list[int] = -2
    seed: int = 0
    precision: str = "auto"  # every training step: bf16 autocast where the hardware has it (trainer/loop.py)
    # Region phrases that name the place too ("large red circle at the top left"): it makes the place
    # linear in the tower's features but did not help "where" questions (docs/REPRODUCTION.md, "Alone,
    # mixed, and where things are"), so the presets leave it off.
    clip_phrase_position: bool = False
    # The region losses' second vocabulary: the 9 place phrases in their own softmax (trainer/base_models.py),
    # so every patch of an object says where the object is; it is what taught "where" (docs/REPRODUCTION.md,
    # "Where things are, from the tower").
    clip_place_phrases: bool = False
    compile: bool = False  # torch.compile the base CLIP's and both stages' training steps (trainer/loop.py)
    short_phase: StageConfig | None = None  # stage 2's short-question phase (module doc); None: none
    # The check after the phase (module doc): one question of each phase form on this many scenes of their
    # own, teacher-forced; while a form scores below phase_check_min, one more epoch of the phase, at most
    # phase_extra_epochs times. 0 scenes: no check.
    phase_check_scenes: int = 0
    phase_check_min: float = 0.75
    phase_extra_epochs: int = 2
    # A phase still stuck after its extra epochs: stage 1 and the phase again on the next seed, checked the
    # same way, at most this many times; stage 2 starts from the draw whose check ended best.
    phase_redraws: int = 0
    reasoning_pass: StageConfig | None = None  # the pass that closes stage 2 (module doc); None: none
    notes: dict = field(default_factory=dict)


def preset(name: str) -> Recipe:
    if name == "default":
        return with_short_phase(Recipe(
            n_train=12000, n_eval=200, vocab_size=512, image_size=96,
            vision=VisionConfig(hidden_size=160, intermediate_size=640, num_hidden_layers=4, num_attention_heads=5,
                                image_size=96, patch_size=16, projection_dim=128),
            text=TextConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
            clip_epochs=45, clip_batch=128, clip_lr=2e-3, clip_region_weight=1.0, clip_patch_weight=1.0,
            clip_place_phrases=True, lm_epochs=0.3,
            stage1=StageConfig(stage=1, lr=2e-3, batch_size=64, micro_batch_size=64, epochs=1),
            stage2=StageConfig(stage=2, lr=1e-3, batch_size=32, micro_batch_size=32, epochs=4),
            reasoning_pass=StageConfig(stage=2, lr=2e-4, batch_size=32, micro_batch_size=32, epochs=1),
        ))
    if name == "smoke":
        return with_short_phase(Recipe(
            n_train=96, n_eval=8, vocab_size=320, image_size=32,
            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=16, projection_dim=16),
            text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
            clip_epochs=2, clip_batch=32, clip_lr=1e-3, clip_region_weight=1.0, clip_patch_weight=1.0,
            clip_place_phrases=True, lm_epochs=4,
            stage1=StageConfig(stage=1, lr=5e-3, batch_size=8, micro_batch_size=8, epochs=3),
            stage2=StageConfig(stage=2, lr=2e-3, batch_size=16, micro_batch_size=8, epochs=4, log_every=1),
            reasoning_pass=StageConfig(stage=2, lr=5e-4, batch_size=16, micro_batch_size=8, epochs=1, log_every=1),
        ), smoke=True)
    raise ValueError(f"unknown recipe {name!r}; choose default or smoke")


def with_short_phase(r: Recipe, smoke: bool = False) -> Recipe:
    """Stage 2 opened by the short-question phase (module doc), then 2 epochs of the mix."""
    # Not fresh for smoke: its 96 scenes are too few to learn from scratch.
    r.short_phase = StageConfig(stage=2, lr=r.stage2.lr, batch_size=32 if smoke else 128,
                                micro_batch_size=16 if smoke else 32, epochs=1 if smoke else 3,
                                group_by_length=False, fresh_llm=not smoke, max_grad_norm=0.0,
                                adam_beta2=0.95)
    r.stage2.epochs = 2
    r.phase_check_scenes, r.phase_extra_epochs, r.phase_redraws = (16, 0, 0) if smoke else (300, 2, 1)
    return r


def without_short_phase(r: Recipe) -> Recipe:
    """`--no-short-phase`: stage 2 as the paper has it, the instruction mix alone, for 4 epochs."""
    r.short_phase = None
    r.stage2.epochs = 4
    return r


def image_processor_for(size: int) -> ImageProcessorConfig:
    return ImageProcessorConfig(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_pad=True)


def _object_labels(scenes: list, phrases: list[str], phrase_of) -> np.ndarray:
    """Per scene, the index in `phrases` of each object's phrase ([scenes, MAX_OBJECTS], -1: none)."""
    index = {p: i for i, p in enumerate(phrases)}
    labels = np.full((len(scenes), MAX_OBJECTS), -1, dtype=np.int64)
    for i, s in enumerate(scenes):
        labels[i, : len(s.objects)] = [index[phrase_of(o)] for o in s.objects]
    return labels


def region_phrases(scenes: list, with_position: bool = False) -> tuple[list[str], np.ndarray]:
    """Every phrase the region loss contrasts ("large red circle", or with_position "large red circle
    at the top left") and, per scene, the index of each object's phrase ([scenes, MAX_OBJECTS], -1: none)."""
    phrase = (lambda o: f"{describe(o)} {at_position(o.position)}") if with_position else describe
    cells = [(row, col) for row in range(len(ROWS)) for col in range(len(COLS))] if with_position else [(0, 0)]
    phrases = [phrase(SceneObject(color, shape, size, row, col)) for size in SIZES for color in COLORS
               for shape in SHAPES for row, col in cells]
    return phrases, _object_labels(scenes, phrases, phrase)


def place_phrases(scenes: list) -> tuple[list[str], np.ndarray]:
    """The 9 place phrases ("at the top left", ...) and, per scene, the index of each object's place
    ([scenes, MAX_OBJECTS], -1: none)."""
    places = [at_position(position_name(row, col)) for row in range(len(ROWS)) for col in range(len(COLS))]
    return places, _object_labels(scenes, places, lambda o: at_position(o.position))


def make_base_models(data_dir: Path, base_dir: Path, r: Recipe, log=print) -> dict:
    """Tokenizer, contrastive CLIP and causal LM trained on the data set's training split."""
    timings = {}
    t = time.time()
    ids = build_tokenizer_files(base_dir / "tokenizer", corpus_text(data_dir), vocab_size=r.vocab_size)
    text = TextProcessor.load(base_dir / "tokenizer", ids.image_token_id, 1)
    r.text.vocab_size = ids.vocab_size
    r.text.bos_token_id, r.text.eos_token_id, r.text.pad_token_id = ids.bos_token_id, ids.eos_token_id, ids.pad_token_id
    timings["tokenizer_s"] = time.time() - t
    log(f"tokenizer: {ids.vocab_size} tokens, <image> = {ids.image_token_id}")

    t = time.time()
    scenes = [(sid, s) for sid, s in load_scenes(data_dir).items()]
    train_ids = [sid for sid, _ in scenes][: r.n_train]
    image_config = image_processor_for(r.image_size)
    pixels = image_pixels(data_dir / "images", [f"{sid}.png" for sid in train_ids], image_config).numpy()
    def encode(s: str) -> list[int]:
        return text.tokenizer.encode(s, add_special_tokens=False).ids + [ids.eos_token_id]

    train_scenes = [s for _, s in scenes[: r.n_train]]
    captions = [encode(detailed_description(s)) for s in train_scenes]
    phrases, labels = region_phrases(train_scenes, r.clip_phrase_position)
    places, place_labels = place_phrases(train_scenes) if r.clip_place_phrases else (None, None)
    regions = ClipRegions(np.stack([patch_coverage(s, r.image_size, r.vision.patch_size) for s in train_scenes]),
                          labels, [encode(p) for p in phrases], place_labels,
                          [encode(p) for p in places] if places else None)
    clip_text = TextConfig(vocab_size=ids.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512)
    clip_recipe = ClipRecipe(r.vision, clip_text, epochs=r.clip_epochs, batch_size=r.clip_batch, lr=r.clip_lr,
                             region_weight=r.clip_region_weight, patch_weight=r.clip_patch_weight,
                             feature_layer=r.feature_layer, precision=r.precision, compile=r.compile)
    clip = train_clip(pixels, captions, clip_recipe, image_config, base_dir, seed=r.seed, regions=regions)
    timings["clip_s"] = time.time() - t
    log(f"CLIP: final contrastive loss {clip['final_loss']:.3f} after {clip['steps']} steps")

    t = time.time()
    sequences = [[ids.bos_token_id] + text.tokenizer.encode(s, add_special_tokens=False).ids + [ids.eos_token_id]
                 for s in corpus_text(data_dir)]
    lm = train_llm(sequences, LMRecipe(r.text, epochs=r.lm_epochs, precision=r.precision), base_dir,
                   pad_id=ids.pad_token_id, seed=r.seed)
    timings["llm_s"] = time.time() - t
    log(f"LLM: final loss {lm['final_loss']:.3f} after {lm['steps']} steps")
    return {"timings": timings, "clip_final_loss": clip["final_loss"], "llm_final_loss": lm["final_loss"]}


def run_recipe(out: Path, name: str = "default", ship_to: Path | None = None, log=print, reuse: Path | None = None,
               stage2_types: list[str] | None = None, short_phase: bool = True, reasoning_pass: bool = True,
               **overrides) -> dict:
    """Run the whole recipe into `out`. For ablations, `reuse` names a finished run whose data and base
    models (and stage 1 and the short-question phase, when their settings match) are used instead of
    being made again, and `stage2_types` keeps only those instruction types ("conversation", "detail",
    "reasoning"; the reasoning pass runs only when they include reasoning); `short_phase=False` drops
    stage 2's short-question phase and `reasoning_pass=False` the pass that closes it (module doc)."""
    from .evaluate import evaluate

    r = preset(name)
    for key, value in overrides.items():
        setattr(r, key, value)
    if not short_phase:
        without_short_phase(r)
    if not reasoning_pass or (stage2_types and "reasoning" not in stage2_types):
        r.reasoning_pass = None
    for sc in (r.stage1, r.stage2, r.short_phase, r.reasoning_pass):
        if sc is not None:
            sc.precision, sc.compile, sc.seed = r.precision, r.compile, r.seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"recipe": name, "config": asdict(r), "timings": {}}
    t0 = time.time()
    if reuse is not None:
        reuse = Path(reuse)
        data, base_dir = reuse / "data", reuse / "base"
        for need in (data / "eval.json", base_dir / "clip", base_dir / "llm", base_dir / "tokenizer",
                     reuse / "report.json"):
            if not need.exists():
                raise FileNotFoundError(f"--reuse {reuse}: {need} is missing; point it at a finished recipe run")
        report["reused"] = str(reuse)
        report["config"].update(reused_base_config(json.loads((reuse / "report.json").read_text())["config"]))
        log(f"reusing data and base models from {reuse}")
    else:
        data, base_dir = out / "data", out / "base"
        if not (data / "eval.json").is_file():
            generate_dataset(data, r.n_train, r.n_eval, seed=r.seed)
        report["timings"]["data_s"] = time.time() - t0
        base = make_base_models(data, base_dir, r, log)
        report["base"] = base
        report["timings"].update(base["timings"])
    t = time.time()
    phase_from = None  # a reused run whose short-question phase this one would train again
    if reuse is not None and r.stage1.epochs > 0 and _same_stage1(reuse, r):
        s1, stage2_from = {"reused": str(reuse / "stage1" / "final")}, reuse / "stage1" / "final"
        log(f"reusing stage 1 from {stage2_from} (same vision features, projector and stage-1 settings)")
        phase_from = reuse if _same_phase(reuse, r) else None
    else:
        s1, stage2_from = draw_stage1(base_dir, data, out, r, log)
    report["timings"]["stage1_s"] = time.time() - t
    t = time.time()
    instruct = data / "instruct.json"
    if stage2_types:
        samples = [s for s in json.loads(instruct.read_text()) if s.get("type") in stage2_types]
        if not samples:
            raise ValueError(f"{instruct}: no samples of type {stage2_types}; types are conversation, detail, reasoning")
        instruct = out / f"instruct-{'-'.join(stage2_types)}.json"
        instruct.write_text(json.dumps(samples))
        log(f"stage 2 on {len(samples)} samples of type {', '.join(stage2_types)}")
    if phase_from is not None:  # the same stage 1, questions, settings and seed train the same phase
        stage2_from = phase_from / json.loads((phase_from / "report.json").read_text()).get("phase_model",
                                                                                          "stage2-short/final")
        report["stage2_short"] = {"reused": str(stage2_from)}
        log(f"reusing the short-question phase from {stage2_from} (same stage 1 and phase settings)")
    elif r.short_phase is not None:
        short = write_short_questions(data, out / "short.json", seed=r.seed)
        report["stage2_short"] = run_stage(stage2_from, short, data, out / "stage2-short", r.short_phase, log=log)
        stage2_from = out / "stage2-short" / "final"
        if r.phase_check_scenes:
            stage2_from, report["phase_check"], redraws = settle_phase(stage2_from, short, data, base_dir, out, r, log)
            if redraws:
                report["phase_redraws"] = redraws
        report["phase_model"] = str(stage2_from.relative_to(out))
        report["timings"]["stage2_short_s"] = time.time() - t
        t = time.time()
    s2 = run_stage(stage2_from, instruct, data, out / "stage2", r.stage2, log=log)
    report["timings"]["stage2_s"] = time.time() - t
    report["stage1"], report["stage2"] = s1, s2
    report["final_model"] = "stage2/final"
    if r.reasoning_pass is not None:
        t = time.time()
        questions = write_reasoning_pass(data, out / "reasoning-pass.json", seed=r.seed + 1,
                                         descriptions="detail" in (stage2_types or ["detail"]))
        report["reasoning_pass"] = run_stage(out / "stage2" / "final", questions, data, out / "stage2-reasoning",
                                             r.reasoning_pass, log=log)
        report["final_model"] = "stage2-reasoning/final"
        report["timings"]["reasoning_pass_s"] = time.time() - t
    t = time.time()
    report["eval"] = evaluate(out / report["final_model"], data, data / "eval.json")
    report["timings"]["eval_s"] = time.time() - t
    report["timings"]["total_s"] = time.time() - t0
    report["stage2_types"] = stage2_types or "all"
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if ship_to is not None:
        ship_run(out, ship_to)
    return report


# The phase's bare yes/no relation: no draw has learnt it in the phase (docs/REPRODUCTION.md, "Steadier
# steps in the phase"); stage 2's answers, which name the rows or columns first, teach it.
PHASE_CHECK_SKIPS = ("q_relative_short",)


def check_phase(model: Path, short: Path, data: Path, check: Path, out: Path, r: Recipe, log=print,
                where: Path | None = None) -> tuple[Path, list[dict]]:
    """The check after the short-question phase (module doc) on the questions `check`
    (`data.write_lookup_check`): the model stage 2 would start from (the phase's, or the one after the extra
    epochs it needed, trained into `where`, by default `out`) and each round's accuracy by form."""
    from .evaluate import teacher_forced_by_form

    where = where or out
    rounds = []
    for extra in range(r.phase_extra_epochs + 1):
        by_form = teacher_forced_by_form(model, check, check.parent)
        stuck = [f for f, v in by_form.items() if f not in PHASE_CHECK_SKIPS and v["accuracy"] < r.phase_check_min]
        rounds.append({"model": str(model.relative_to(out)), "by_form": by_form, "stuck": stuck})
        log("phase check: " + ", ".join(f"{f} {v['accuracy']:.1%}" for f, v in by_form.items())
            + (f"; below {r.phase_check_min:.0%}: {', '.join(stuck)}" if stuck else ""))
        if not stuck or extra == r.phase_extra_epochs:
            break
        # The same questions in another order, the learning rate warmed up again from the stuck model: a lookup
        # leaves its plateau at its own time, and the first cosine ended before this one did.
        sc = replace(r.short_phase, epochs=1, fresh_llm=False, seed=r.short_phase.seed + 1 + extra)
        run_stage(model, short, data, where / f"stage2-short-extra{extra + 1}", sc, log=log)
        model = where / f"stage2-short-extra{extra + 1}" / "final"
    return model, rounds


def settle_phase(model: Path, short: Path, data: Path, base_dir: Path, out: Path, r: Recipe,
                 log=print) -> tuple[Path, list[dict], list[dict]]:
    """The check after the phase and what it leads to (module doc): the extra epochs (`check_phase`), then,
    while a form is still below the bar, stage 1 and the phase drawn again on seeds r.seed + 1, + 2, ... into
    out/redraw1, redraw2, ..., each checked on the same questions, at most r.phase_redraws times. Returns the
    model of the draw whose check ended best (fewest forms stuck, then the highest lowest form), the first
    draw's check rounds and each redraw's report."""
    def ended(rounds: list[dict]) -> tuple:
        last = rounds[-1]
        return len(last["stuck"]), -min(v["accuracy"] for f, v in last["by_form"].items() if f not in PHASE_CHECK_SKIPS)

    check = write_lookup_check(out / "phase-check", r.phase_check_scenes, seed=r.seed)
    model, rounds = check_phase(model, short, data, check, out, r, log)
    best, best_rounds, redraws = model, rounds, []
    for k in range(1, r.phase_redraws + 1):
        if not best_rounds[-1]["stuck"]:
            break
        d, where = with_seed(r, r.seed + k), out / f"redraw{k}"
        log(f"phase check: still stuck; drawing stage 1 and the phase again with seed {d.seed} into {where}")
        draw = {"seed": d.seed}
        draw["stage1"], phase_from = draw_stage1(base_dir, data, where, d, log)
        short = write_short_questions(data, where / "short.json", seed=d.seed)
        draw["stage2_short"] = run_stage(phase_from, short, data, where / "stage2-short", d.short_phase, log=log)
        model, draw["phase_check"] = check_phase(where / "stage2-short" / "final", short, data, check, out, d, log,
                                                 where=where)
        redraws.append(draw)
        if ended(draw["phase_check"]) < ended(best_rounds):
            best, best_rounds = model, draw["phase_check"]
    if best_rounds[-1]["stuck"]:
        tried = f"seed {r.seed}" if not redraws else f"seeds {r.seed} to {r.seed + len(redraws)}"
        log(f"warning: {', '.join(best_rounds[-1]['stuck'])} still below {r.phase_check_min:.0%} after "
            f"{r.phase_extra_epochs} extra epochs ({tried}); stage 2 starts from {best}, and the final model will "
            f"fall short on them; `llava-train recipe OUT2 --reuse {out} --seed {r.seed + len(redraws) + 1}` draws "
            f"stage 1 and the phase again on the same data and base models")
    return best, rounds, redraws


def draw_stage1(base_dir: Path, data: Path, where: Path, r: Recipe, log=print) -> tuple[dict, Path]:
    """The LLaVA model built from the base models with r.seed's projector (where/stage0), and stage 1 on it
    unless the ablation skips it: the stage's report and the model stage 2 starts from."""
    build_llava(base_dir / "clip", base_dir / "llm", base_dir / "tokenizer", where / "stage0",
                projector_type=r.projector_type, feature_layer=r.feature_layer, seed=r.seed)
    if r.stage1.epochs <= 0:  # ablation: straight to stage 2 with an untrained projector
        return {"skipped": True}, where / "stage0"
    return (run_stage(where / "stage0", data / "pretrain.json", data, where / "stage1", r.stage1, log=log),
            where / "stage1" / "final")


def with_seed(r: Recipe, seed: int) -> Recipe:
    """`r` with every draw of its stages on `seed`."""
    stages = {k: replace(getattr(r, k), seed=seed) for k in ("stage1", "stage2", "short_phase", "reasoning_pass")
              if getattr(r, k) is not None}
    return replace(r, seed=seed, **stages)


def ship_run(out: Path, ship_to: Path) -> None:
    """Copy a finished run's final model to `ship_to` with its training report, then write its
    verified ONNX export beside it, so llava-infer answers with it without torch."""
    from llava_rt.export.cli import main as export_main

    out, ship_to = Path(out), Path(ship_to)
    final = json.loads((out / "report.json").read_text()).get("final_model", "stage2/final")  # older reports: stage 2
    staging, old = ship_to.with_name(ship_to.name + ".tmp"), ship_to.with_name(ship_to.name + ".old")
    for leftover in (staging, old):  # from an interrupted earlier ship
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(out / final, staging)
    shutil.copy(out / "report.json", staging / "training_report.json")
    # Swap whole directories, so an interrupted copy never leaves a half-shipped model; the export
    # (written atomically by llava-export) runs in place so its manifest names the shipped path.
    if ship_to.exists():
        ship_to.rename(old)
    staging.rename(ship_to)
    shutil.rmtree(old, ignore_errors=True)
    if export_main([str(ship_to), "--quiet"]) != 0:
        raise RuntimeError(f"the ONNX export of {ship_to} failed; see above (rerun: llava-export {ship_to})")


# The settings that made a run's data and base models: with --reuse they are the reused run's, not the preset's.
BASE_FIELDS = ("n_train", "n_eval", "vocab_size", "image_size", "vision", "text", "clip_epochs", "clip_batch",
               "clip_lr", "clip_region_weight", "clip_patch_weight", "clip_phrase_position", "clip_place_phrases",
               "lm_epochs")


def reused_base_config(reused: dict) -> dict:
    """The base-model settings of a reused run's report config; a field its report predates has the
    default it was made with."""
    return {k: reused.get(k, _recipe_defaults().get(k)) for k in BASE_FIELDS}


def _recipe_defaults() -> dict:
    """Recipe's field defaults: what a run whose report predates a field was made with."""
    return {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}


def _same_stage1(run: Path, r: Recipe) -> bool:
    """Whether `run` trained its stage 1 with the settings `r` would use, so it can be reused."""
    report = run / "report.json"
    if not (run / "stage1" / "final" / "config.json").is_file() or not report.is_file():
        return False
    cfg = json.loads(report.read_text())["config"]
    return (cfg.get("feature_layer") == r.feature_layer and cfg.get("projector_type") == r.projector_type
            and cfg.get("seed") == r.seed and _same_settings(cfg.get("stage1", {}), r.stage1))


def _same_phase(run: Path, r: Recipe) -> bool:
    """Whether `run`'s short-question phase is the one `r` would train, given that its stage 1 is reused
    (`_same_stage1`): the phase's questions come from the shared data and seed, so with the same settings
    only what follows the phase differs (--stage2-types, --no-reasoning-pass)."""
    if r.short_phase is None or not (run / "stage2-short" / "final" / "config.json").is_file():
        return False
    cfg = {**_recipe_defaults(), **json.loads((run / "report.json").read_text())["config"]}  # older: no check
    return (_same_settings(cfg.get("short_phase"), r.short_phase)
            and all(cfg[k] == getattr(r, k) for k in ("phase_check_scenes", "phase_check_min", "phase_extra_epochs",
                                                      "phase_redraws")))


def _same_settings(saved: dict | None, want: StageConfig) -> bool:
    """A stage's settings in a run's report against `want`; a report from before a new field has its default."""
    want = json.loads(json.dumps(asdict(want), default=str))
    return saved is not None and {**want, **saved} == want
