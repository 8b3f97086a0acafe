"""llava-train: the smoke recipe end to end, torchrun parity, kill-and-resume, bad data, evaluators.

One smoke recipe (data, tokenizer, CLIP, LM, stage 1, stage 2, eval; about a minute on 2 cores)
is trained once per session; the other tests start from its checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_rt.checkpoint import load_model
from llava_rt.runtime.pipeline import Pipeline
from llava_rt.runtime.sampling import SamplingParams
from llava_rt.tokenizer import TextProcessor
from llava_rt.trainer.data import (IGNORE_INDEX, generate_dataset, load_examples, load_scenes, to_messages,
                                   write_lookup_check, write_short_questions)
from llava_rt.trainer.evaluate import evaluate_scienceqa, objects_mentioned, objects_placed, parse_answer_letter
from llava_rt.trainer.instructions import DETAIL_QUESTIONS, detailed_description
from llava_rt.trainer.loop import batch_indices
from llava_rt.trainer.recipe import run_recipe, ship_run
from llava_rt.trainer.stages import mean_loss

ROOT = Path(__file__).resolve().parents[1]


def losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    report = run_recipe(out, "smoke", log=lambda *_: None)
    (out / "report.test.json").write_text(json.dumps(report, default=str))
    return out


def test_smoke_recipe_loss_falls_and_checkpoint_loads(smoke):
    report = json.loads((smoke / "report.test.json").read_text())
    for stage in ("stage1", "stage2"):
        assert (smoke / stage / "loss.png").stat().st_size > 1000
    curve = losses(smoke / "stage2" / "metrics.jsonl")  # every step: one batch's loss is noisy, five are not
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5]), curve
    # Stage 1's per-batch losses are noisy at this size; over the whole caption set the aligned
    # projector must beat the fresh one, and stage 2 must beat stage 1 on the instruction data.
    data = smoke / "data"
    captions = [mean_loss(smoke / m, data / "pretrain.json", data, stage=1) for m in ("stage0", "stage1/final")]
    assert captions[1] < 0.97 * captions[0], captions
    instruct = [mean_loss(smoke / m, data / "instruct.json", data, stage=2, limit=64)
                for m in ("stage1/final", "stage2/final")]
    assert instruct[1] < 0.7 * instruct[0], instruct
    for key in ("conversation_exact_match", "reasoning_exact_match", "detail_objects_named", "detail_objects_placed"):
        assert 0.0 <= report["eval"][key] <= 1.0
    forms = report["eval"]["by_question"]
    counts = report["eval"]["counts"]
    assert sum(f["n"] for f in forms.values()) == counts["conversation"] + counts.get("reasoning", 0)
    n_conv = sum(f["n"] for k, f in forms.items() if k.startswith("conversation: "))
    hits = sum(f["accuracy"] * f["n"] for k, f in forms.items() if k.startswith("conversation: "))
    assert n_conv == counts["conversation"] and abs(hits / n_conv - report["eval"]["conversation_exact_match"]) < 1e-3
    final = smoke / "stage2" / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.jinja"):
        assert (final / name).is_file(), name
    assert not list(smoke.rglob("*.tmp*")), "a temporary checkpoint directory was left behind"
    pipe = Pipeline.load(final)
    answer = pipe.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                       [Image.open(smoke / "data" / "images" / "000000.png")], SamplingParams(max_new_tokens=8))
    assert answer.prompt_tokens > pipe.text.image_seq_length and 1 <= len(answer.token_ids) <= 8


def test_ablation_reuses_a_finished_run_and_filters_instruction_types(smoke, tmp_path):
    from llava_rt.trainer.recipe import BASE_FIELDS, _same_stage1, preset, reused_base_config

    out = tmp_path / "conversation-only"
    # lm_epochs only shapes the base LLM, which is reused: the report must name the one it used.
    report = run_recipe(out, "smoke", log=lambda *_: None, reuse=smoke, stage2_types=["conversation"],
                        short_phase=False, lm_epochs=99.0)
    assert report["stage1"] == {"reused": str(smoke / "stage1" / "final")}
    # --no-short-phase: stage 2 straight from stage 1, on the mix alone, for 4 epochs.
    assert "stage2_short" not in report and not (out / "short.json").exists()
    # Conversation only: no reasoning pass either, and stage 2's model is the final one.
    assert "reasoning_pass" not in report and report["final_model"] == "stage2/final"
    assert report["config"]["reasoning_pass"] is None and not (out / "stage2-reasoning").exists()
    assert report["config"]["short_phase"] is None and report["config"]["stage2"]["epochs"] == 4
    # The smoke run itself has the phase (the default): the short questions first, then stage 2.
    full = json.loads((smoke / "report.json").read_text())
    assert [report["config"][k] for k in BASE_FIELDS] == [full["config"][k] for k in BASE_FIELDS]
    assert report["config"]["lm_epochs"] == full["config"]["lm_epochs"] != 99.0
    older = {k: v for k, v in full["config"].items() if k != "clip_place_phrases"}  # a report from before the field
    assert reused_base_config(older)["clip_place_phrases"] is False and full["config"]["clip_place_phrases"] is True
    assert full["stage2_short"]["samples"] == len(json.loads((smoke / "short.json").read_text()))
    # ... and closes with the reasoning pass from stage 2's model: per training scene a sample of questions and
    # a description.
    assert full["final_model"] == "stage2-reasoning/final" and full["config"]["reasoning_pass"]["epochs"] == 1
    assert full["reasoning_pass"]["samples"] + full["reasoning_pass"]["rejected"] == 2 * full["config"]["n_train"]
    curve = losses(smoke / "stage2-short" / "metrics.jsonl")
    assert curve[-1] < 0.7 * curve[0], curve
    assert full["config"]["stage2"]["epochs"] == 2 and full["config"]["short_phase"]["group_by_length"] is False
    assert full["config"]["short_phase"]["max_grad_norm"] == 0.0 and full["config"]["short_phase"]["adam_beta2"] == 0.95
    assert not (out / "data").exists() and not (out / "base").exists()
    kinds = [s["type"] for s in json.loads((smoke / "data" / "instruct.json").read_text())]
    assert report["stage2"]["samples"] + report["stage2"]["rejected"] == kinds.count("conversation") < len(kinds)
    assert (out / "stage2" / "final" / "model.safetensors").is_file()
    r = preset("smoke")
    assert _same_stage1(smoke, r)
    r.feature_layer = -1  # other vision features need their own stage 1
    assert not _same_stage1(smoke, r)
    with pytest.raises(FileNotFoundError, match="--reuse"):
        run_recipe(tmp_path / "x", "smoke", log=lambda *_: None, reuse=tmp_path / "nothing-here")


def test_ablation_after_the_phase_reuses_the_phase(smoke, tmp_path):
    """An ablation that differs only after the short-question phase (--stage2-types, --no-reasoning-pass)
    starts stage 2 from the reused run's phase instead of training the same phase again."""
    from llava_rt.trainer.recipe import _same_phase, preset

    out = tmp_path / "detail-only"
    report = run_recipe(out, "smoke", log=lambda *_: None, reuse=smoke, stage2_types=["detail"])
    assert report["stage1"] == {"reused": str(smoke / "stage1" / "final")}
    assert report["stage2_short"] == {"reused": str(smoke / "stage2-short" / "final")}
    assert not (out / "stage2-short").exists() and not (out / "short.json").exists()
    kinds = [s["type"] for s in json.loads((smoke / "data" / "instruct.json").read_text())]
    assert report["stage2"]["samples"] + report["stage2"]["rejected"] == kinds.count("detail") > 0
    assert "reasoning_pass" not in report and (out / "stage2" / "final" / "model.safetensors").is_file()
    r = preset("smoke")
    assert _same_phase(smoke, r)
    r.short_phase.lr *= 2  # other phase settings train another phase
    assert not _same_phase(smoke, r)
    r = preset("smoke")
    r.short_phase = None
    assert not _same_phase(smoke, r)


def test_recipe_seed_reaches_every_stage(smoke, tmp_path):
    """`llava-train recipe --seed N --reuse RUN`: a seed run on the same data and base models (how
    docs/REPRODUCTION.md measures seed variance); N must reach each stage's initialisation and order."""
    from llava_rt.trainer.recipe import preset

    s1 = preset("smoke").stage1
    s1.epochs = 0.0  # no stage 1, to keep the test short
    report = run_recipe(tmp_path / "seed3", "smoke", log=lambda *_: None, reuse=smoke,
                        stage2_types=["reasoning"], short_phase=False, reasoning_pass=False, seed=3, stage1=s1)
    assert report["config"]["seed"] == 3 and report["config"]["stage2"]["seed"] == 3
    assert json.loads((smoke / "report.json").read_text())["config"]["stage2"]["seed"] == 0
    # a different draw of the projector than the seed-0 build of the same base models
    seed3, seed0 = (load_file(str(d / "stage0" / "model.safetensors")) for d in (tmp_path / "seed3", smoke))
    key = next(k for k in seed3 if "multi_modal_projector" in k and k.endswith("weight"))
    assert not torch.equal(seed3[key], seed0[key])


def test_teacher_forced_exact_match_is_greedy_exact_match(smoke, tmp_path):
    """The phase check's score (evaluate.teacher_forced_by_form) is, per single-turn sample, whether greedy
    decoding gives the reference answer and then stops: checked sample by sample against the engine's
    greedy answers, and on the model's own answers as references, which it must score 100%."""
    from llava_rt.runtime.generate import generate
    from llava_rt.trainer.evaluate import teacher_forced_by_form

    model = smoke / "stage2" / "final"
    folder = tmp_path / "check"
    samples = json.loads(write_lookup_check(folder, 6, seed=0).read_text())
    forms = {s["id"].rsplit("-", 1)[-1] for s in samples}
    assert {"q_count_all", "q_where", "q_exists"} <= forms  # every scene has these forms
    for i, s in enumerate(samples):  # one "form" per sample, to see each sample's score
        s["id"] = f"x-s{i}"
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps(samples))
    pipe = Pipeline.load(model)
    text = pipe.text
    params = SamplingParams(max_new_tokens=32)
    requests = [pipe.prepare(to_messages(s["conversations"][:1]), [Image.open(folder / s["image"])], params)
                for s in samples]
    outs = list(generate(pipe.engine, requests, text.eos_token_ids))
    examples, _ = load_examples(alone, folder, text, "v1", 512)
    labelled = [[t for t in e.labels[1:] if t != -100] for e in examples]
    eos = text.tokenizer.token_to_id(text.eos_token)  # the token the v1 template ends each answer with
    greedy = [o.token_ids + ([eos] if o.finish_reason == "stop" else []) for o in outs]
    scores = teacher_forced_by_form(model, alone, folder)
    hits = [scores[f"s{i}"]["accuracy"] for i in range(len(samples))]
    assert hits == [float(g == want) for g, want in zip(greedy, labelled)]
    # The model's own answers as the references: every one whose tokens the tokenizer gives back is a hit.
    for s, o in zip(samples, outs):
        s["conversations"][1]["value"] = text.decode(o.token_ids).strip()
    alone.write_text(json.dumps(samples))
    examples, _ = load_examples(alone, folder, text, "v1", 512)
    same = [i for i, (e, g) in enumerate(zip(examples, greedy)) if [t for t in e.labels[1:] if t != -100] == g]
    assert len(same) >= len(samples) // 2, (len(same), len(samples))
    scores = teacher_forced_by_form(model, alone, folder)
    assert all(scores[f"s{i}"]["accuracy"] == 1.0 for i in same)


def test_phase_check_adds_epochs_while_a_form_is_stuck(smoke, tmp_path):
    """The check after the short-question phase (recipe.check_phase): a form below the bar gets one more epoch
    of the phase from the stuck model, at most phase_extra_epochs times, and stage 2 starts from the last."""
    from llava_rt.trainer.data import write_lookup_check
    from llava_rt.trainer.recipe import check_phase, preset

    full = json.loads((smoke / "report.json").read_text())
    (check,) = full["phase_check"]  # the smoke preset checks and adds nothing (phase_extra_epochs 0)
    assert check["model"] == "stage2-short/final" and full["phase_model"] == "stage2-short/final"
    assert "phase_redraws" not in full
    assert set(check["by_form"]) >= {"q_count_all", "q_where"}
    assert all(0 <= v["accuracy"] <= 1 for v in check["by_form"].values())
    r = preset("smoke")
    r.phase_check_scenes, r.phase_check_min, r.phase_extra_epochs = 4, 1.01, 1  # every form stuck
    out = tmp_path / "run"
    (out / "stage2-short").mkdir(parents=True)
    shutil.copytree(smoke / "stage2-short" / "final", out / "stage2-short" / "final")
    questions = write_lookup_check(out / "phase-check", r.phase_check_scenes, seed=r.seed)
    model, rounds = check_phase(out / "stage2-short" / "final", smoke / "short.json", smoke / "data", questions, out,
                                r, log=lambda *_: None)
    assert model == out / "stage2-short-extra1" / "final" and [x["model"] for x in rounds] == [
        "stage2-short/final", "stage2-short-extra1/final"]
    assert all(x["stuck"] for x in rounds)
    extra = [json.loads(line) for line in (out / "stage2-short-extra1" / "metrics.jsonl").read_text().splitlines()]
    assert extra[-1]["epoch"] == 1.0  # one epoch of the phase's questions
    before, after = (load_file(str(d / "model.safetensors")) for d in (smoke / "stage2-short" / "final", model))
    key = next(k for k in before if "layers.0" in k and k.endswith("weight"))
    assert not torch.equal(before[key], after[key])
    r.phase_check_min = 0.0  # nothing stuck: no extra epoch
    model, rounds = check_phase(out / "stage2-short" / "final", smoke / "short.json", smoke / "data", questions, out,
                                r, log=lambda *_: None)
    assert model == out / "stage2-short" / "final" and len(rounds) == 1 and not rounds[0]["stuck"]


def test_a_phase_stuck_after_its_epochs_is_drawn_again(smoke, tmp_path):
    """recipe.settle_phase: a phase still stuck after its extra epochs is drawn again (stage 1 and the phase on
    the next seed, checked on the same questions), stage 2 starts from the draw whose check ended best, and the
    warning names the command for one more draw."""
    from llava_rt.trainer.recipe import PHASE_CHECK_SKIPS, preset, settle_phase

    r = preset("smoke")
    r.phase_check_scenes, r.phase_check_min, r.phase_extra_epochs, r.phase_redraws = 4, 1.01, 0, 1  # all stuck
    out = tmp_path / "run"
    shutil.copytree(smoke / "stage2-short" / "final", out / "stage2-short" / "final")
    lines = []
    model, rounds, (draw,) = settle_phase(out / "stage2-short" / "final", smoke / "short.json", smoke / "data",
                                          smoke / "base", out, r, log=lines.append)
    assert [x["model"] for x in rounds] == ["stage2-short/final"]
    assert draw["seed"] == 1 and [x["model"] for x in draw["phase_check"]] == ["redraw1/stage2-short/final"]
    assert draw["stage1"]["steps"] > 0 and draw["stage2_short"]["steps"] > 0
    assert set(draw["phase_check"][0]["by_form"]) == set(rounds[0]["by_form"])  # the same check questions
    # another seed: another projector after stage 1, and other phase questions
    a, b = (load_file(str(d / "model.safetensors")) for d in (smoke / "stage1" / "final",
                                                              out / "redraw1" / "stage1" / "final"))
    key = next(k for k in a if "multi_modal_projector" in k and k.endswith("weight"))
    assert not torch.equal(a[key], b[key])
    assert (out / "redraw1" / "short.json").read_text() != (smoke / "short.json").read_text()

    def lowest(x):
        return min(v["accuracy"] for f, v in x[-1]["by_form"].items() if f not in PHASE_CHECK_SKIPS)
    redrawn = lowest(draw["phase_check"]) > lowest(rounds)  # every form is stuck in both: the lowest decides
    assert model == (out / "redraw1" / "stage2-short" / "final" if redrawn else out / "stage2-short" / "final")
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "seeds 0 to 1" in warning and "--seed 2" in warning and str(model) in warning
    r.phase_check_min = 0.0  # nothing stuck: no redraw
    assert settle_phase(out / "stage2-short" / "final", smoke / "short.json", smoke / "data", smoke / "base", out, r,
                        log=lambda *_: None)[2] == []


def test_stage2_labels_are_exactly_the_answers(smoke):
    model = smoke / "stage2" / "final"
    cfg = json.loads((model / "config.json").read_text())
    text = TextProcessor.load(model, cfg["image_token_index"], cfg["image_seq_length"])
    data = json.loads((smoke / "data" / "instruct.json").read_text())[:20]
    examples, rejected = load_examples(smoke / "data" / "instruct.json", smoke / "data", text, "v1", 512, limit=20)
    assert not rejected and len(examples) == 20
    for sample, ex in zip(data, examples):
        labelled = [t for t in ex.labels if t != IGNORE_INDEX]
        answers = [t["value"] for t in sample["conversations"][1::2]]
        assert text.decode(labelled, skip_special_tokens=False).replace(" ", "") == "".join(
            a + "</s>" for a in answers).replace(" ", "")
        assert ex.input_ids.count(cfg["image_token_index"]) == cfg["image_seq_length"]
        # every image token and every human token is masked
        assert all(lab == IGNORE_INDEX for tok, lab in zip(ex.input_ids, ex.labels) if tok == cfg["image_token_index"])


def test_unmasked_right_padded_loss_is_exact_and_bf16_is_close(smoke):
    """The trainer drops the attention mask (causal is exact under right padding) and trains in
    bf16 autocast where the CPU has native bf16; both must give the masked fp32 loss."""
    import torch.nn.functional as F

    from llava_rt.trainer.data import collate
    from llava_rt.trainer.loop import autocast_for
    from llava_rt.trainer.stages import StageData, scored_tokens

    src, data_dir = smoke / "stage1" / "final", smoke / "data"
    model = load_model(src).eval()
    data = StageData.load(model, src, data_dir / "instruct.json", data_dir, 2, limit=16)
    idx = list(range(16))
    batch = [data.examples[i] for i in idx]
    arrays = {k: torch.from_numpy(v) for k, v in collate(batch, data.pad_id).items()}
    assert arrays["attention_mask"].min() == 0  # the batch really is padded
    images = data.images[[data.slot[e.image] for e in batch]]
    with torch.no_grad():
        logits = model(arrays["input_ids"], attention_mask=arrays["attention_mask"], vision_features=images)
        masked = F.cross_entropy(logits[:, :-1].flatten(0, 1), arrays["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(data.loss(model, idx), masked, rtol=1e-5, atol=0)
        # loss_mean="sample": each example's own mean over its answer tokens, summed over the examples
        alone = [data.loss(model, [i]).item() / scored_tokens(data.examples[i]) for i in idx]
        assert len({round(a, 3) for a in alone}) > 8  # the examples really differ
        torch.testing.assert_close(data.loss(model, idx, per_sample=True).item(), sum(alone), rtol=1e-5, atol=0)
        with autocast_for("bf16", torch.device("cpu")):
            bf16 = data.loss(model, idx)
        with autocast_for("fp32", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    assert bf16.dtype == torch.float32 and abs(bf16.item() - masked.item()) / masked.item() < 2e-2
    assert bf16.item() != masked.item()  # it really ran in bf16
    with pytest.raises(ValueError, match="choose auto, bf16 or fp32"):
        autocast_for("fp16", torch.device("cpu"))
    from llava_rt.trainer.stages import StageConfig, run_stage

    with pytest.raises(ValueError, match="choose token or sample"):
        run_stage(src, data_dir / "instruct.json", data_dir, smoke / "unused",
                  StageConfig(stage=2, lr=1e-3, batch_size=8, micro_batch_size=8, epochs=1, loss_mean="answer"))


def test_tune_vision_trains_the_tower_and_the_default_keeps_it_frozen(smoke, tmp_path):
    from llava_rt.trainer.stages import StageConfig, StageData, run_stage

    src, data = smoke / "stage1" / "final", smoke / "data"
    model = load_model(src).eval()
    idx = list(range(16))
    cached = StageData.load(model, src, data / "instruct.json", data, 2, limit=16)
    pixels = StageData.load(model, src, data / "instruct.json", data, 2, limit=16, tune_vision=True)
    with torch.no_grad():  # cached tower output and the tower run on the (fp16-cached) pixels agree
        torch.testing.assert_close(pixels.loss(model, idx), cached.loss(model, idx), rtol=5e-3, atol=0)
    before = load_file(src / "model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    # (tune, the tower's own lr): frozen; tuned at the LLM's lr; tuned at lr 0 (its own param group)
    for tune, vision_lr in ((False, None), (True, None), (True, 0.0)):
        sc = StageConfig(stage=2, lr=1e-3, batch_size=8, micro_batch_size=8, epochs=1, limit=16, tune_vision=tune,
                         vision_lr=vision_lr)
        out = tmp_path / f"{tune}-{vision_lr}"
        run_stage(src, data / "instruct.json", data, out, sc, log=lambda *_: None)
        after = load_file(out / "final" / "model.safetensors")
        changed = [k for k in vision if not torch.equal(before[k], after[k])]
        moves = tune and vision_lr != 0.0
        assert vision and bool(changed) == moves, (tune, vision_lr, changed)
        assert moves == any("patch_embedding" in k for k in changed)  # gradients reach the first layer
        assert not torch.equal(before["language_model.lm_head.weight"], after["language_model.lm_head.weight"])


@pytest.mark.slow
def test_compiled_training_matches_eager(smoke, tmp_path):
    from llava_rt.trainer.stages import StageConfig, run_stage

    src, data = smoke / "stage1" / "final", smoke / "data"
    curves = []
    torch._dynamo.reset()
    for compiled in (False, True):
        sc = StageConfig(stage=2, lr=1e-3, batch_size=8, micro_batch_size=4, epochs=1, limit=32, precision="fp32",
                         compile=compiled)
        run_stage(src, data / "instruct.json", data, tmp_path / str(compiled), sc, log=lambda *_: None)
        curves.append(losses(tmp_path / str(compiled) / "metrics.jsonl"))
    # Same batches, same updates: only the fused kernels' rounding differs.
    assert len(curves[0]) == len(curves[1]) >= 2
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile


def test_weight_decay_shrinks_each_trained_weight_by_lr_times_decay(smoke, tmp_path):
    """AdamW's decoupled decay: one step at lr 1e-3 with decay 0.5 ends 5e-4 * w0 below the same step
    without it, for every trained weight; the frozen tower is untouched either way."""
    from llava_rt.trainer.stages import StageConfig, run_stage

    src, data = smoke / "stage1" / "final", smoke / "data"
    w0 = load_file(src / "model.safetensors")
    final = {}
    for decay in (0.0, 0.5):
        sc = StageConfig(stage=2, lr=1e-3, batch_size=8, micro_batch_size=8, epochs=1, limit=8, precision="fp32",
                         weight_decay=decay)
        run_stage(src, data / "instruct.json", data, tmp_path / str(decay), sc, log=lambda *_: None)
        final[decay] = load_file(tmp_path / str(decay) / "final" / "model.safetensors")
    trained = [k for k in w0 if not torch.equal(final[0.0][k], w0[k])]
    assert trained and all(torch.equal(final[0.5][k], w0[k]) for k in w0 if k not in trained)
    assert any("vision_tower" in k for k in w0) and not any("vision_tower" in k for k in trained)
    for k in trained:
        torch.testing.assert_close(final[0.0][k] - final[0.5][k], 5e-4 * w0[k], rtol=1e-2, atol=1e-8, msg=k)


def test_adam_beta2_reaches_the_optimizer(smoke, tmp_path):
    """`--adam-beta2` sets AdamW's second-moment decay: the checkpoint's optimizer holds it, and from the
    second step on (the first is lr * sign(g) for any beta2) it trains other weights than the default."""
    from llava_rt.trainer.cli import main

    common = ["--batch-size", "8", "--micro-batch-size", "8", "--epochs", "1", "--precision", "fp32"]
    for name, extra in (("default", []), ("b95", ["--adam-beta2", "0.95"])):
        assert main(_stage_cmd(smoke, tmp_path / name, *common, *extra)) == 0
    betas = {name: torch.load(tmp_path / name / "checkpoint-last" / "optimizer.pt", weights_only=True)
             ["optimizer"]["param_groups"][0]["betas"] for name in ("default", "b95")}
    assert tuple(betas["default"]) == (0.9, 0.999) and tuple(betas["b95"]) == (0.9, 0.95)
    wa, wb = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("default", "b95"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if "multi_modal_projector" in k)


def _stage_cmd(smoke: Path, out: Path, *extra: str) -> list[str]:
    return ["stage2", "--model", str(smoke / "stage1" / "final"), "--data", str(smoke / "data" / "instruct.json"),
            "--image-folder", str(smoke / "data"), "--out", str(out), "--limit", "48", "--lr", "1e-3", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_and_kill(cmd: list[str], out: Path, at_step: int, total: int) -> int:
    """Start a training command, SIGKILL it (and any workers) once its checkpoint reaches at_step;
    returns the step the checkpoint holds."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoint-last" / "trainer_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= at_step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    stopped_at = json.loads(state.read_text())["step"]
    assert at_step <= stopped_at < total and not (out / "final").exists()
    return stopped_at


def test_torchrun_two_processes_match_one(smoke, tmp_path):
    common = ["--batch-size", "8", "--micro-batch-size", "2", "--epochs", "1"]
    one = subprocess.run([sys.executable, "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, tmp_path / "one", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                          "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, tmp_path / "two", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one" / "metrics.jsonl"), losses(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) >= 2
    np.testing.assert_allclose(a, b, rtol=1e-4)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_matches_one_process_and_resumes_after_a_kill(smoke, tmp_path):
    """`--fsdp` under torchrun (FSDP2, gloo): killed midway and resumed from its gathered full checkpoint,
    it ends at the one-process weights."""
    common = ["--batch-size", "8", "--micro-batch-size", "2", "--epochs", "2", "--save-every", "1"]
    one = subprocess.run([sys.executable, "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, tmp_path / "one", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, out, *common, "--fsdp")]
    _run_and_kill(cmd, out, 4, 12)  # torchrun and both workers
    # the checkpoint holds full tensors, not one rank's shards
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wk = load_file(out / "checkpoint-last" / "model" / "model.safetensors")
    assert {k: v.shape for k, v in wk.items()} == {k: v.shape for k, v in wa.items()}

    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    wb = load_file(out / "final" / "model.safetensors")
    changed = 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
        changed += not torch.equal(wb[k], wk[k])
    assert changed > 0  # the resumed steps trained


def test_killed_run_resumes_to_the_same_weights(smoke, tmp_path):
    common = ["--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--save-every", "1"]
    ref = subprocess.run([sys.executable, "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, tmp_path / "ref", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llava_rt.trainer.cli", *_stage_cmd(smoke, out, *common)]
    stopped_at = _run_and_kill(cmd, out, 5, 24)

    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == 24 - stopped_at
    wa = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    wb = load_file(out / "final" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_bad_samples_are_reported_and_skipped(smoke, tmp_path):
    good = json.loads((smoke / "data" / "instruct.json").read_text())[:6]
    ok = good[0]["conversations"]
    bad = [
        {"id": "missing-image", "image": "images/nope.png", "conversations": ok},
        {"id": "no-image-tag", "image": good[0]["image"],
         "conversations": [{"from": "human", "value": "What is it?"}, ok[1]]},
        {"id": "empty-turn", "image": good[0]["image"], "conversations": [ok[0], {"from": "gpt", "value": "  "}]},
        {"id": "too-long", "image": good[0]["image"],
         "conversations": [ok[0], {"from": "gpt", "value": "red circle " * 400}]},
        {"id": "wrong-order", "image": good[0]["image"], "conversations": [ok[1], ok[0]]},
        "not an object",
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(good[:3] + bad + good[3:]))
    model = smoke / "stage1" / "final"
    cfg = json.loads((model / "config.json").read_text())
    text = TextProcessor.load(model, cfg["image_token_index"], cfg["image_seq_length"])
    examples, rejected = load_examples(path, smoke / "data", text, "v1", max_len=512)
    assert [e.id for e in examples] == [g["id"] for g in good]
    reasons = {r.id: r.reason for r in rejected}
    assert "missing" in reasons["missing-image"]
    assert "<image>" in reasons["no-image-tag"]
    assert "empty" in reasons["empty-turn"]
    assert "longer than the context" in reasons["too-long"]
    assert "should come from human" in reasons["wrong-order"]
    assert "not a JSON object" in reasons["?"]

    run = subprocess.run([sys.executable, "-m", "llava_rt.trainer.cli", "stage2", "--model", str(model), "--data", str(path),
                          "--image-folder", str(smoke / "data"), "--out", str(tmp_path / "out"), "--batch-size", "2",
                          "--micro-batch-size", "2", "--max-len", "512"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for sid in ("missing-image", "no-image-tag", "empty-turn", "too-long", "wrong-order"):
        assert f"skipping sample {sid}:" in run.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()

    unreadable = tmp_path / "broken.json"
    unreadable.write_text("[{")
    run = subprocess.run([sys.executable, "-m", "llava_rt.trainer.cli", "stage2", "--model", str(model), "--data",
                          str(unreadable), "--image-folder", str(smoke / "data"), "--out", str(tmp_path / "out2")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "broken.json" in run.stderr and "Traceback" not in run.stderr


def _transformers_greedy_matches(model_dir: Path, data_dir: Path, n: int) -> None:
    import transformers  # in the dev extra
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    pipe = Pipeline.load(model_dir)
    samples = json.loads((data_dir / "eval.json").read_text())[:n]
    params = SamplingParams(max_new_tokens=24)
    for s in samples:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": s["conversations"][0]["value"].replace("<image>", "").strip()}]}]
        image = Image.open(data_dir / s["image"])
        ours = pipe.chat(messages, [image], params)
        request = pipe.prepare(messages, [image], params)
        from llava_rt.image_processor import preprocess

        pixels = torch.from_numpy(preprocess([image], pipe.image_config))
        ids = torch.tensor([request.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=24, eos_token_id=sorted(pipe.text.eos_token_ids),
                              pad_token_id=pipe.text.pad_token_id)
        theirs = ref[0, ids.shape[1]:].tolist()
        if theirs and theirs[-1] in pipe.text.eos_token_ids:
            theirs = theirs[:-1]
        got = [t for t in ours.token_ids if t not in pipe.text.eos_token_ids]
        assert got == theirs, (s["id"], pipe.text.decode(got), pipe.text.decode(theirs))


def test_trained_smoke_model_matches_transformers(smoke):
    final = json.loads((smoke / "report.json").read_text())["final_model"]  # after the reasoning pass
    _transformers_greedy_matches(smoke / final, smoke / "data", n=4)


DEFAULT_MODEL = ROOT / "models" / "llava-rt-default"


def test_default_model_matches_transformers(tmp_path):
    data = generate_dataset(tmp_path / "data", n_train=0, n_eval=4, seed=123)
    _transformers_greedy_matches(DEFAULT_MODEL, data, n=6)


def test_default_model_ships_a_matching_onnx_export():
    """The README's main command runs the shipped model on onnxruntime without torch: its export
    must be there and match the checkpoint (a retrain without `llava-export` fails here)."""
    from llava_rt.runtime.manifest import read_manifest

    manifest = read_manifest(DEFAULT_MODEL / "onnx", source_dir=DEFAULT_MODEL)
    assert manifest["verification"]["ok"]


def test_default_model_is_small_enough():
    assert (DEFAULT_MODEL / "model.safetensors").is_file(), "models/llava-rt-default is missing; it ships with the repo"
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file() and p.parent == DEFAULT_MODEL)
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"


def test_scienceqa_evaluator(smoke, tmp_path):
    problems = {}
    rng = np.random.default_rng(0)
    for i in range(6):
        pid = str(100 + i)
        has_image = i % 2 == 0
        problems[pid] = {
            "question": "Which shape is shown?", "choices": ["circle", "square", "triangle"][: 2 + i % 2],
            "answer": int(rng.integers(0, 2)), "hint": "A picture of shapes." if i % 3 == 1 else "",
            "image": "image.png" if has_image else None, "subject": ["natural science", "language science"][i % 2],
            "grade": f"grade{1 + 2 * i}", "split": "test" if i < 5 else "train",
        }
        if has_image:
            (tmp_path / pid).mkdir()
            Image.open(smoke / "data" / "images" / "000001.png").save(tmp_path / pid / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    report = evaluate_scienceqa(smoke / "stage2" / "final", tmp_path / "problems.json")
    assert report["counts"]["all"] == 5  # the train-split problem is left out
    assert report["counts"]["context:IMG"] == 3 and report["counts"]["context:TXT"] == 1
    assert report["counts"]["context:NO"] == 1
    assert report["counts"]["grade:G1-6"] == 3 and report["counts"]["grade:G7-12"] == 2
    for pid, r in report["results"].items():
        letter = parse_answer_letter(r["prediction"], len(problems[pid]["choices"]))
        assert r["parsed"] == letter and r["correct"] == (letter == "AB"[problems[pid]["answer"]])
    n_correct = sum(r["correct"] for r in report["results"].values())
    assert report["accuracy"]["all"] == round(n_correct / 5, 4)


def test_question_forms_hide_the_scene_words():
    from llava_rt.trainer.evaluate import question_form

    assert question_form("<image>\nWhat color is the large star?") == "what color is the SIZE SHAPE?"
    assert question_form("Is there a red square at the top left?") == "is there a COLOR SHAPE at the PLACE?"
    assert question_form("How many circles are there?") == "how many SHAPE are there?"
    assert question_form("How many objects are there in the image?") == "how many objects are there in the image?"


def test_answer_letter_parsing_follows_the_llava_repo():
    assert parse_answer_letter("B", 3) == "B"
    assert parse_answer_letter("C. triangle", 3) == "C"
    assert parse_answer_letter("The answer is A.", 2) == "A"
    assert parse_answer_letter("D", 3) == "FAILED"  # not one of the options
    assert parse_answer_letter("I think it is a circle", 2) == "FAILED"


def test_batches_are_a_pure_function_of_the_step():
    lengths = np.random.default_rng(0).integers(5, 50, size=200)
    a = [batch_indices(200, s, 25, 8, seed=3, lengths=lengths) for s in range(50)]
    b = [batch_indices(200, s, 25, 8, seed=3, lengths=lengths) for s in range(50)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for epoch in range(2):  # each epoch visits every example exactly once
        seen = np.concatenate(a[epoch * 25 : (epoch + 1) * 25])
        assert sorted(seen.tolist()) == list(range(200))
    assert not np.array_equal(np.concatenate(a[:25]), np.concatenate(a[25:]))


def test_micro_batches_are_cut_from_the_batch_sorted_by_length(tmp_path):
    """Each step's batch is sorted by length before it is cut into micro-batches (less padding), and the
    accumulated update equals one micro-batch of the whole batch: the loss is one sum over the batch."""
    from llava_rt.trainer.loop import TrainConfig, train

    lengths = np.random.default_rng(1).integers(3, 40, size=64)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))

    def run(micro: int, group: bool) -> tuple[torch.Tensor, list]:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        parts = []

        def loss_fn(m, idx):
            parts.append(idx.copy())
            return (m(x[idx]).squeeze(-1) ** 2 * torch.from_numpy(lengths[idx]).float()).sum(), 0

        cfg = TrainConfig(out_dir=str(tmp_path / f"{micro}-{group}"), lr=0.05, batch_size=16, micro_batch_size=micro,
                          epochs=1, group_by_length=group, precision="fp32", desc="test")
        train(model, list(model.parameters()), 64, loss_fn, lambda idx: int(lengths[idx].sum()), cfg,
              lambda m, path: None, lengths=lengths)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), parts

    whole, parts_whole = run(16, group=False)
    cut, parts = run(4, group=False)
    assert len(parts) == 16 and len(parts_whole) == 4
    for step in range(4):  # the same examples each step, sorted and cut in four
        batch = np.concatenate(parts[step * 4 : step * 4 + 4])
        assert sorted(batch.tolist()) == sorted(parts_whole[step].tolist())
        assert np.all(np.diff(lengths[batch]) >= 0)
    assert torch.allclose(whole, cut, atol=1e-6)
    assert not np.array_equal(np.concatenate(parts), np.concatenate(run(4, group=True)[1]))  # grouping still chooses


def test_synthetic_data_is_seeded_and_consistent(tmp_path):
    a = generate_dataset(tmp_path / "a", n_train=6, n_eval=2, seed=7)
    b = generate_dataset(tmp_path / "b", n_train=6, n_eval=2, seed=7)
    assert (a / "instruct.json").read_text() == (b / "instruct.json").read_text()
    assert (a / "images" / "000003.png").read_bytes() == (b / "images" / "000003.png").read_bytes()
    from llava_rt.trainer.data import load_scenes

    scenes = load_scenes(a)
    for s in json.loads((a / "instruct.json").read_text()):
        first = s["conversations"][0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        assert s["type"] in ("conversation", "detail", "reasoning")
        if s["type"] == "detail":  # the description names every object by colour and shape
            scene = scenes[s["id"].split("-")[0]]
            named = objects_mentioned(s["conversations"][1]["value"])
            assert sum(named.values()) == len(scene.objects)
            placed = objects_placed(s["conversations"][1]["value"])
            assert placed == Counter((o.position, o.color, o.shape) for o in scene.objects)
            assert detailed_description(scene) == s["conversations"][1]["value"]
    pretrain = json.loads((a / "pretrain.json").read_text())
    assert len(pretrain) == 6 and len(json.loads((a / "eval.json").read_text())) >= 4


def test_threaded_rendering_gives_each_scene_its_own_image_and_boxes(tmp_path):
    """generate_dataset renders in threads after drawing every scene: each image must be what render gives
    for its scene alone, and scenes.jsonl must hold the boxes that render filled in."""
    from llava_rt.trainer.world import Scene, render

    data = generate_dataset(tmp_path / "d", n_train=9, n_eval=3, seed=11)
    rows = [json.loads(line) for line in (data / "scenes.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(12)]
    for row in rows:
        saved = [o.box for o in Scene.from_dict(row["scene"]).objects]
        fresh = Scene.from_dict(row["scene"])
        for o in fresh.objects:
            o.box = (0, 0, 0, 0)
        drawn = np.asarray(render(fresh))
        assert [o.box for o in fresh.objects] == saved and all(b != (0, 0, 0, 0) for b in saved)
        assert np.array_equal(drawn, np.asarray(Image.open(data / "images" / f"{row['id']}.png").convert("RGB")))


def test_frozen_tower_features_are_computed_once_per_tower_and_image_set(smoke, tmp_path):
    from llava_rt.image_processor import ImageProcessorConfig, load_image, preprocess
    from llava_rt.trainer.stages import image_features

    src, data = smoke / "stage1" / "final", smoke / "data"
    model, config = load_model(src).eval(), ImageProcessorConfig.load(src)
    paths = sorted({e["image"] for e in json.loads((data / "instruct.json").read_text())})[:20]
    with torch.inference_mode():  # the plain way: one batch of every image
        plain = model.vision_features(torch.from_numpy(preprocess([load_image(data / p) for p in paths], config)))
    first = image_features(model, data, paths, config, batch=8)  # blocks of 8 read in threads
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    assert image_features(load_model(src), data, paths, config, batch=8) is first  # another load, same tower
    changed = load_model(src)
    with torch.no_grad():
        changed.vision_tower.embeddings.patch_embedding.weight.mul_(1.5)
    assert not torch.allclose(image_features(changed, data, paths, config, batch=8), first)
    moved = tmp_path / "images"  # the same files elsewhere: computed again, to the same values
    shutil.copytree(data / "images", moved)
    again = image_features(model, tmp_path, paths, config, batch=8)
    assert again is not first and torch.equal(again, first)


def test_fresh_llm_restarts_the_llm_and_keeps_the_tower_and_projector(smoke, tmp_path):
    from llava_rt.checkpoint import load_model
    from llava_rt.trainer.stages import StageConfig, run_stage

    start = smoke / "stage1" / "final"
    sc = StageConfig(stage=2, lr=0.0, batch_size=8, micro_batch_size=8, epochs=1, stop_after=1, fresh_llm=True)
    run_stage(start, smoke / "data" / "instruct.json", smoke / "data", tmp_path / "out", sc, log=lambda *_: None)
    before = load_model(start).state_dict()
    after = load_model(tmp_path / "out" / "checkpoint-last" / "model").state_dict()
    assert before.keys() == after.keys()
    for name, w in after.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):  # lr 0: stage 1's projector as it was
            assert torch.equal(w, before[name]), name
        elif "norm" in name:
            assert torch.all(w == 1.0), name
        elif name.endswith("bias"):
            assert torch.all(w == 0.0), name
        else:  # a fresh N(0, 0.02) draw, unrelated to the trained weight it replaces
            assert abs(w.std().item() - 0.02) < 0.004 and not torch.allclose(w, before[name]), name


def test_short_questions_ask_each_form_once_per_training_scene(tmp_path):
    data = generate_dataset(tmp_path / "d", n_train=12, n_eval=2, seed=3)
    path = write_short_questions(data, tmp_path / "short.json", seed=0)
    assert path.read_text() == write_short_questions(data, tmp_path / "again.json", seed=0).read_text()
    samples = json.loads(path.read_text())
    scenes = load_scenes(data)
    by_scene = Counter(s["id"].split("-")[0] for s in samples)
    assert sorted(by_scene) == [f"{i:06d}" for i in range(12)]  # the training scenes, none of the held-out ones
    assert all(len(set(s["conversations"][0]["value"] for s in samples if s["id"].startswith(sid))) == n
               for sid, n in by_scene.items())  # no question twice for one image
    for s in samples:
        (question, answer), scene = s["conversations"], scenes[s["id"].split("-")[0]]
        assert len(s["conversations"]) == 2 and "<image>" in question["value"]
        assert s["image"] == f"images/{s['id'].split('-')[0]}.png"
        if "How many objects are there" in question["value"]:
            assert f" {len(scene.objects)} object" in answer["value"]
    # Every conversation form is asked of every scene where it has a definite answer: counting questions always.
    assert sum("How many objects are there" in s["conversations"][0]["value"] for s in samples) == 12


def test_reasoning_pass_asks_fresh_reasoning_and_conversation_questions(tmp_path):
    from llava_rt.trainer.data import corpus_text, write_reasoning_pass

    data = generate_dataset(tmp_path / "d", n_train=40, n_eval=2, seed=3)
    corpus = corpus_text(data)
    path = write_reasoning_pass(data, tmp_path / "pass.json", seed=1)
    assert path.read_bytes() == write_reasoning_pass(data, tmp_path / "again.json", seed=1).read_bytes()
    assert path.read_bytes() != write_reasoning_pass(data, tmp_path / "other.json", seed=2).read_bytes()
    assert corpus_text(data) == corpus  # drawn beside the data set, not into it: the tokenizer's corpus is unchanged
    everything = json.loads(path.read_text())
    samples = [s for s in everything if s["type"] == "reasoning"]
    descriptions = [s for s in everything if s["type"] == "detail"]
    assert len(samples) + len(descriptions) == len(everything)
    for kept in (samples, descriptions):  # training scenes, once each
        assert sorted(s["image"] for s in kept) == [f"images/{i:06d}.png" for i in range(40)]
    assert [s["image"] for s in samples] != sorted(s["image"] for s in samples)  # in a random order
    # Beside each, the scene's detailed description asked in one of the stage-2 wordings, single-turn.
    scenes = load_scenes(data)
    for s in descriptions:
        question, answer = s["conversations"]
        assert question["value"].replace("<image>", "").strip() in DETAIL_QUESTIONS
        assert answer["value"] == detailed_description(scenes[s["id"].split("-")[0]])
    without = json.loads(write_reasoning_pass(data, tmp_path / "without.json", seed=1, descriptions=False).read_text())
    assert {s["type"] for s in without} == {"reasoning"} and len(without) == 40
    reasoning_words = ("If all the", "Are there more", "What color is the object farthest", "What color is the highest",
                       "What color is the lowest", "How many objects are to the", "How many other objects")
    instruct = json.loads((data / "instruct.json").read_text())
    known = {(t["value"].replace("<image>", "").strip(), a["value"]) for s in instruct
             for t, a in zip(s["conversations"][::2], s["conversations"][1::2])}
    fresh, seen = 0, 0
    for s in samples:
        turns = s["conversations"]
        assert "<image>" in turns[0]["value"] and all("<image>" not in t["value"] for t in turns[1:])
        questions = [t["value"].replace("<image>", "").strip() for t in turns[::2]]
        n_reasoning = sum(q.startswith(reasoning_words) for q in questions)
        assert len(questions) - n_reasoning == 2 and 1 <= n_reasoning <= 4, questions  # 3-4 drawn, a scene may have fewer
        assert len(set(questions)) == len(questions)
        for q, a in zip(questions, [t["value"] for t in turns[1::2]]):
            seen += 1
            fresh += (q, a) not in known
    assert fresh > seen // 3  # new draws, not the stage-2 questions again


def named_object(scene, ref):
    """The one object a reference ("circle", "red object", "large red circle") names in the scene."""
    (obj,) = [o for o in scene.objects if set(ref.split()) - {"object"} <= {o.color, o.shape, o.size}]
    return obj


def test_relation_answers_name_the_rows_or_columns_before_a_verdict_that_follows_from_them():
    """Conversations answer "is the X left of / above the Y?" with both objects' columns or rows, then the
    verdict; the short-question phase keeps the bare yes/no from the same draws. Checked against the
    scene's grid."""
    import re

    from llava_rt.trainer.instructions import SHORT, q_relative, q_relative_short
    from llava_rt.trainer.world import COLS, ROWS, sample_scene

    rng, checked = random.Random(5), Counter()
    for n in range(300):
        scene = sample_scene(rng)
        made, short = q_relative(scene, random.Random(n)), q_relative_short(scene, random.Random(n))
        assert (made is None) == (short is None)
        if made is None:
            continue
        q = re.fullmatch(r"Is the (.+) (to the left of|above) the (.+)\?", made[0])
        m = re.fullmatch(r"The (.+) is in the (\w+) (row|column) and the (.+) is in the (\w+) \3, so (yes|no), "
                         r"the \1 is (to the left of|to the right of|above|below) the \4\.", made[1])
        assert q and m and (m[1], m[4]) == (q[1], q[3]), made
        a, b = named_object(scene, m[1]), named_object(scene, m[4])
        left = q[2] == "to the left of"
        assert m[3] == ("column" if left else "row")
        names = COLS if left else ROWS
        assert (names.index(m[2]), names.index(m[5])) == ((a.col, b.col) if left else (a.row, b.row))
        truth = a.col < b.col if left else a.row < b.row
        relation = {(True, True): "to the left of", (True, False): "to the right of",
                    (False, True): "above", (False, False): "below"}[left, truth]
        assert (m[6] == "yes") == truth and m[7] == relation
        assert short == (made[0], f"{m[6].capitalize()}, the {m[1]} is {relation} the {m[4]}.")
        checked[left, m[6]] += 1
    assert len(checked) == 4 and min(checked.values()) > 20
    assert q_relative not in SHORT and q_relative_short in SHORT


def test_count_to_the_side_answers_count_each_column_then_the_sum():
    import re

    from llava_rt.trainer.instructions import r_count_left_of
    from llava_rt.trainer.world import COLS, sample_scene

    rng, seen = random.Random(4), Counter()
    for _ in range(300):
        scene = sample_scene(rng)
        if (made := r_count_left_of(scene, rng)) is None:
            continue
        side = re.fullmatch(r"How many objects are to the (left|right) of the (.+)\?", made[0])
        m = re.fullmatch(r"The (.+) is at the ([a-z ]+?)(?:, and (.+))?, so there (?:is|are) (no|\d+) objects? to its "
                         r"(left|right)\.", made[1])
        assert side and m and m[1] == side[2] and m[5] == side[1], made
        obj = named_object(scene, m[1])
        assert obj.position == m[2]
        want = [c for c in range(len(COLS)) if (c < obj.col if m[5] == "left" else c > obj.col)]
        steps = re.findall(r"(no|none|\d+)(?: objects?)? in the (\w+) column", m[3] or "")
        assert [COLS.index(name) for _, name in steps] == want
        for k, name in steps:
            assert (0 if k in ("no", "none") else int(k)) == sum(o.col == COLS.index(name) for o in scene.objects)
        total = sum(o.col in want for o in scene.objects)
        assert (0 if m[4] == "no" else int(m[4])) == total
        seen[len(want), total > 0] += 1
    assert len(seen) == 5 and min(seen.values()) > 10


def test_same_color_answers_count_the_colour_then_the_others():
    import re

    from llava_rt.trainer.instructions import r_same_color
    from llava_rt.trainer.world import sample_scene

    rng, seen = random.Random(9), Counter()
    for _ in range(300):
        scene = sample_scene(rng)
        if (made := r_same_color(scene, rng)) is None:
            continue
        m = re.fullmatch(r"The (.+) is (\w+), and there (?:is|are) (no|\d+) \2 objects?, so there (?:is|are) "
                         r"(no|\d+) other objects? of that color\.", made[1])
        assert m, made
        n, k = (0 if g == "no" else int(g) for g in (m[3], m[4]))
        assert named_object(scene, m[1]).color == m[2]  # the object the question names, and its colour
        assert n == sum(o.color == m[2] for o in scene.objects) and k == n - 1
        seen[k] += 1
    assert seen[0] > 50 and seen[1] > 20


def test_ship_run_replaces_the_model_and_writes_a_verified_export(smoke, tmp_path):
    """`recipe --ship` (trainer/recipe.ship_run): the final checkpoint, the run's report and a verified
    ONNX export replace whatever was at the destination, and no staging directory is left."""
    dest = tmp_path / "models" / "shipped"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an older model")
    (dest.parent / "shipped.old").mkdir()  # left by an interrupted earlier ship
    (dest.parent / "shipped.old" / "x").write_text("x")
    ship_run(smoke, dest)
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["shipped"]
    final = smoke / "stage2-reasoning" / "final"  # the reasoning pass's model, not stage 2's
    assert (dest / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    assert (dest / "model.safetensors").read_bytes() != (smoke / "stage2" / "final" / "model.safetensors").read_bytes()
    assert json.loads((dest / "training_report.json").read_text())["recipe"] == "smoke"
    manifest = json.loads((dest / "onnx" / "manifest.json").read_text())
    assert manifest["verification"]["ok"] and manifest["source"]["path"] == str(dest)


def test_patch_coverage_finds_the_rendered_objects():
    """The region loss pools the patches world.patch_coverage names for each object: after the
    image processor's pad-to-square and resize, the object's own pixels must lie in those patches."""
    from llava_rt.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
    from llava_rt.trainer.recipe import image_processor_for
    from llava_rt.trainer.world import COLORS, Scene, SceneObject, patch_coverage, render

    style = {"background_kind": "plain", "antialias": False, "jitter": 0, "seed": 3}
    for width, height in ((240, 130), (130, 240), (160, 160)):
        objects = [SceneObject("red", "square", "large", 0, 2), SceneObject("blue", "circle", "small", 2, 0),
                   SceneObject("green", "triangle", "large", 1, 1)]
        scene = Scene(width, height, "white", objects, style)
        image = render(scene)
        coverage = patch_coverage(scene, 96, 16)
        assert coverage.shape == (5, 36) and not coverage[3:].any()
        np.testing.assert_allclose(coverage[:3].sum(1), 1.0, rtol=1e-5)
        pixels = preprocess([image], image_processor_for(96))[0].transpose(1, 2, 0)
        rgb = (pixels * np.array(OPENAI_CLIP_STD) + np.array(OPENAI_CLIP_MEAN)) * 255
        for k, obj in enumerate(objects):
            mine = np.abs(rgb - np.array(COLORS[obj.color])).max(-1) < 30  # the object's interior
            per_patch = mine.reshape(6, 16, 6, 16).sum((1, 3)).reshape(-1)
            assert per_patch.sum() > 20
            inside = per_patch[coverage[k] > 0].sum() / per_patch.sum()
            assert inside == 1.0, (width, height, obj.color, inside)
            assert per_patch[coverage[k].argmax()] > 0


def test_patch_region_loss_matches_a_loop_over_patches():
    """The per-patch region loss of the base CLIP: for every present object, each patch's
    cross-entropy against the object's phrase, weighted by the share of the object's box in that
    patch, averaged over objects; summed over the phrase vocabularies (objects, and places in a
    softmax of their own). Checked against a plain loop over vocabularies, images, objects and patches."""
    import torch.nn.functional as F

    from llava_rt.config import TextConfig, VisionConfig
    from llava_rt.trainer.base_models import ContrastiveCLIP

    torch.manual_seed(0)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=16)
    text = TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = ContrastiveCLIP(vision, text, embed_dim=16, feature_layer=-2, patch_weight=1.0).eval()
    pixels, ids, lengths = torch.randn(3, 3, 32, 32), torch.randint(4, 40, (3, 7)), torch.tensor([7, 5, 6])
    coverage = torch.rand(3, 4, 16) * (torch.rand(3, 4, 16) < 0.4)
    coverage = coverage / coverage.sum(-1, keepdim=True).clamp(min=1e-9)
    labels = torch.tensor([[2, 0, -1, -1], [5, 1, 3, -1], [4, -1, -1, -1]])
    coverage[labels < 0] = 0
    objects = (labels, torch.randint(4, 40, (6, 4)), torch.tensor([4, 3, 4, 2, 4, 3]))
    places = (torch.where(labels >= 0, torch.tensor([[1, 2, 0, 0], [0, 2, 1, 0], [2, 0, 0, 0]]), -1),
              torch.randint(4, 40, (3, 3)), torch.tensor([3, 2, 3]))
    with torch.no_grad():
        contrastive = model(pixels, ids, lengths)
        one = model(pixels, ids, lengths, (coverage, objects)) - contrastive
        both = model(pixels, ids, lengths, (coverage, objects, places)) - contrastive
        patches = model.vision.hidden_states(pixels, upto=2)[-2][:, 1:]
        scale = model.logit_scale.exp()
        want = []
        for vocab_labels, phrase_ids, phrase_lengths in (objects, places):
            phrases = model.embed_text(phrase_ids, phrase_lengths)
            total, n = 0.0, 0
            for b in range(3):
                for k in range(4):
                    if vocab_labels[b, k] < 0:
                        continue
                    n += 1
                    for p in range(16):
                        logits = scale * F.normalize(model.region_projection(patches[b, p]), dim=-1) @ phrases.t()
                        total += coverage[b, k, p] * F.cross_entropy(logits[None], vocab_labels[b, k][None])
            want.append(total / n)
    torch.testing.assert_close(one, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both, want[0] + want[1], rtol=1e-5, atol=1e-6)
    assert want[0] > 0.1 and want[1] > 0.1  # real loss terms, not zeros that pass trivially


def test_region_phrases_name_each_object_and_optionally_its_place():
    from llava_rt.trainer.recipe import place_phrases, region_phrases
    from llava_rt.trainer.world import COLORS, SHAPES, SIZES, sample_scene

    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(20)]
    for with_position, per_object in ((False, 1), (True, 9)):
        phrases, labels = region_phrases(scenes, with_position)
        assert len(phrases) == len(set(phrases)) == len(SIZES) * len(COLORS) * len(SHAPES) * per_object
        for s, row in zip(scenes, labels):
            assert (row[len(s.objects):] == -1).all()
            for o, k in zip(s.objects, row):
                want = f"{o.size} {o.color} {o.shape}" + (f" at the {o.position}" if with_position else "")
                assert phrases[k] == want
    places, labels = place_phrases(scenes)
    assert len(places) == len(set(places)) == 9 and "at the top left" in places and "at the center" in places
    for s, row in zip(scenes, labels):
        assert (row[len(s.objects):] == -1).all()
        assert [places[k] for k in row[: len(s.objects)]] == [f"at the {o.position}" for o in s.objects]


@pytest.mark.slow
def test_compiled_base_clip_training_matches_eager(tmp_path):
    """`llava-train recipe --compile` reaches the base CLIP (ClipRecipe.compile): its contrastive and
    region losses train to the eager loss curve, fp32, on random images and captions."""
    from llava_rt.config import TextConfig, VisionConfig
    from llava_rt.image_processor import ImageProcessorConfig
    from llava_rt.trainer.base_models import ClipRecipe, ClipRegions, train_clip

    rng = np.random.default_rng(0)
    n, objects, patches = 16, 3, 4
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=16)
    text = TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    pixels = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    captions = [list(rng.integers(1, 40, rng.integers(3, 9))) for _ in range(n)]
    labels = rng.integers(-1, 5, (n, objects))  # -1: no object in that slot
    coverage = rng.random((n, objects, patches)).astype(np.float32) * (labels[..., None] >= 0)
    regions = ClipRegions(coverage, labels, [list(rng.integers(1, 40, 3)) for _ in range(5)])
    torch._dynamo.reset()
    curves = []
    for compiled in (False, True):
        recipe = ClipRecipe(vision, text, embed_dim=16, batch_size=8, epochs=3, region_weight=1.0, patch_weight=1.0,
                            precision="fp32", compile=compiled)
        train_clip(pixels, captions, recipe, ImageProcessorConfig(), tmp_path / str(compiled), regions=regions)
        curves.append(losses(tmp_path / str(compiled) / "clip-run" / "metrics.jsonl"))
    assert len(curves[0]) == len(curves[1]) >= 2
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
