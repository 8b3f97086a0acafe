"""Run an export against our torch model on sample inputs and say which graph drifted, if any.

Sample pairs are seeded random images (normalized-pixel statistics) with random text ids around
one <image>, so any checkpoint can be verified without data. Per graph:

  vision   image embeddings of all sample images in one batch vs torch;
  decoder  fed the *torch* image embeddings (so vision drift does not leak in), the torch greedy
           path is replayed through the export token by token (teacher forcing): logits of the
           prefill and of every decode step are compared, and argmax agreement is counted. All
           argmaxes agreeing is the same as identical free-running greedy answers. Run once with
           the pairs batched together (padding, masks, ragged past) and once one by one.

Errors are relative to the largest reference value (max(1, max|ref|)), so a tolerance means the
same for a random checkpoint and a trained one whose logits reach 30.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llava_rt.runtime.engine import SequenceInput
from llava_rt.runtime.ort_engine import OrtEngine
from llava_rt.runtime.torch_engine import TorchEngine


@dataclass(frozen=True)
class Tolerance:
    vision: float  # max |diff| / max(1, max |ref|) of image embeddings
    logits: float  # the same for decoder logits
    agreement: float  # minimum fraction of teacher-forced argmaxes that agree


# fp16 and int quantization round differently from fp32 torch; their answers may part ways on
# near-ties (random weights have many), so agreement is a floor, not identity.
TOLERANCES = {
    "fp32": Tolerance(1e-4, 1e-4, 1.0),
    "fp16": Tolerance(2e-2, 5e-2, 0.8),
    "int8": Tolerance(1e-4, 1e-1, 0.8),  # activations are int8 too in the kernel (accuracy_level 4)
    "int4": Tolerance(1e-4, 3e-1, 0.5),
}

_seq_ids = itertools.count(1 << 40)


def sample_pairs(config, pairs: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    size = config.vision_config.image_size
    pixels = rng.standard_normal((pairs, config.vision_config.num_channels, size, size)).astype(np.float32)
    top = min(config.text_config.vocab_size, config.image_token_index)
    bos = config.text_config.bos_token_id or 1
    prompts = []
    for i in range(pairs):
        before = rng.integers(3, top, 1 + i % 3).tolist()
        after = rng.integers(3, top, 3 + (7 * i) % 17).tolist()
        prompts.append([bos] + before + [config.image_token_index] * config.image_seq_length + after)
    return pixels, prompts


def trace(engine, prompts, images, steps: int, forced: list[list[int]] | None, batched: bool):
    """Logits [steps + 1, vocab] per prompt: prefill, then decodes of forced (or greedy) tokens."""
    groups = [list(range(len(prompts)))] if batched else [[i] for i in range(len(prompts))]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    for group in groups:
        sids = [next(_seq_ids) for _ in group]
        try:
            out = engine.prefill([SequenceInput(s, prompts[i], images[i]) for s, i in zip(sids, group)])
            for step in range(steps + 1):
                for row, i in enumerate(group):
                    logits[i].append(out[row])
                    tokens[i].append(forced[i][step] if forced else int(out[row].argmax()))
                if step < steps:
                    out = engine.decode(sids, [tokens[i][-1] for i in group])
        finally:
            for s in sids:
                engine.release(s)
    return [np.stack(x) for x in logits], tokens


def _rel(diff: float, ref: np.ndarray) -> float:
    return diff / max(1.0, float(np.abs(ref).max()))


def compare_decoder(ref_logits, got_logits) -> dict:
    diffs = [float(np.abs(r - g).max()) for r, g in zip(ref_logits, got_logits)]
    agree = [(r.argmax(-1) == g.argmax(-1)) for r, g in zip(ref_logits, got_logits)]
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref_logits))
    return {
        "max_abs_diff": max(diffs),
        "rel_diff": max(diffs) / scale,
        "greedy_agreement": float(np.mean(np.concatenate(agree))),
        "identical_answers": int(sum(bool(a.all()) for a in agree)),
    }


def verify_export(export_dir, model_dir, dtype: str, pairs: int = 4, new_tokens: int = 16, seed: int = 0,
                  tolerance: Tolerance | None = None, modes: tuple[str, ...] = ("batched", "unbatched")) -> dict:
    tol = tolerance or TOLERANCES[dtype]
    reference = TorchEngine.load(model_dir)
    export = OrtEngine(export_dir, source_dir=model_dir)
    pixels, prompts = sample_pairs(reference.config, pairs, seed)

    ref_embeds = reference.encode_images(pixels)
    got_embeds = export.encode_images(pixels)
    ref_np = ref_embeds.float().numpy()
    vision_diff = float(np.abs(ref_np - got_embeds.astype(np.float32)).max())
    vision = {"max_abs_diff": vision_diff, "rel_diff": _rel(vision_diff, ref_np)}
    vision["ok"] = vision["rel_diff"] <= tol.vision

    steps = new_tokens - 1
    ref_images = [ref_embeds[i : i + 1] for i in range(pairs)]
    got_images = [ref_np[i : i + 1] for i in range(pairs)]  # torch's embeddings: isolate the decoder
    with torch.inference_mode():
        ref_logits, ref_tokens = trace(reference, prompts, ref_images, steps, None, batched=False)
    decoder = {}
    for mode in modes:
        got_logits, _ = trace(export, prompts, got_images, steps, ref_tokens, batched=mode == "batched")
        decoder[mode] = compare_decoder(ref_logits, got_logits)
    worst_rel = max(d["rel_diff"] for d in decoder.values())
    worst_agree = min(d["greedy_agreement"] for d in decoder.values())
    decoder_ok = worst_rel <= tol.logits and worst_agree >= tol.agreement
    drifted = [name for name, ok in (("vision.onnx", vision["ok"]), ("decoder.onnx", decoder_ok)) if not ok]
    return {
        "dtype": dtype, "pairs": pairs, "new_tokens": new_tokens, "seed": seed,
        "tolerance": tol.__dict__, "vision": vision,
        "decoder": {**decoder, "ok": decoder_ok}, "drifted": drifted, "ok": not drifted,
    }
