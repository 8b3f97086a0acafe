"""The content-lookup experiment of docs/REPRODUCTION.md ("The lookup, isolated").

One question form alone, "What shape is the COLOR object?" (objects whose colour is unique in
their scene), on the frozen tower's features of a recipe run's images. Two learners:

  --learner probe    a small transformer (2 layers, 128 wide, causal, the colour as a query token
                     after the 36 patch features, 3 filler tokens before the answer): what the
                     features allow;
  --learner decoder  the LLaVA checkpoint given by --model (its projector + LLM trained, the v1
                     template, exact match of the whole answer): what our decoder learns.

Scenes [0, 10000) train, the first 1,000 questions of scenes [10000, 12000) score. Example:

    python docs/experiments/lookup.py --run runs/default --model runs/default/stage1/final \\
        --learner decoder --batch 128 --steps 500 --reinit [--save runs/lookup-first]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llava_rt.checkpoint import load_model, save_checkpoint
from llava_rt.image_processor import ImageProcessorConfig
from llava_rt.tokenizer import TextProcessor
from llava_rt.trainer.data import Example, collate, load_scenes, tokenize_v1
from llava_rt.trainer.stages import image_features
from llava_rt.trainer.world import COLORS, SHAPES

N_TRAIN_SCENES, N_SCENES, N_SCORED = 10000, 12000, 1000


def questions(scenes) -> list[tuple[int, int, int]]:
    """(scene index, colour index, shape index) for every object whose colour is unique in its scene."""
    colors = list(COLORS)
    return [(i, colors.index(o.color), SHAPES.index(o.shape))
            for i, (_, s) in enumerate(scenes) for o in s.objects
            if sum(p.color == o.color for p in s.objects) == 1]


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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reinit", action="store_true", help="decoder: re-initialise the LLM's linear layers, N(0, 0.02)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save", type=Path, help="decoder: write the trained checkpoint here (a stage-2 starting point)")
    a = p.parse_args()
    torch.manual_seed(0)
    model_dir = a.model or a.run / "stage1" / "final"
    model = load_model(model_dir)
    scenes = list(load_scenes(a.run / "data").items())[:N_SCENES]
    feats = image_features(model, a.run / "data", [f"images/{sid}.png" for sid, _ in scenes],
                           ImageProcessorConfig.load(model_dir))
    rows = questions(scenes)
    train = [r for r in rows if r[0] < N_TRAIN_SCENES]
    scored = [r for r in rows if r[0] >= N_TRAIN_SCENES][:N_SCORED]

    if a.learner == "probe":
        learner = Probe(feats.shape[-1], feats.shape[1])

        def loss_and_hits(batch):
            b = torch.tensor(batch)
            logits = learner(feats[b[:, 0]], b[:, 1])
            return F.cross_entropy(logits, b[:, 2]), (logits.argmax(1) == b[:, 2]).sum().item()
    else:
        learner = model.train()
        if a.reinit:
            for m in learner.language_model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        for name, param in learner.named_parameters():
            param.requires_grad_(not name.startswith("vision_tower"))
        text = TextProcessor.load(model_dir, learner.config.image_token_index, learner.config.image_seq_length)
        colors = list(COLORS)
        tokenized = {}
        for r in rows:
            color, shape = colors[r[1]], SHAPES[r[2]]
            turns = [{"from": "human", "value": f"<image>\nWhat shape is the {color} object?"},
                     {"from": "gpt", "value": f"The {color} object is a {shape}."}]
            tokenized[r] = Example(str(r[0]), None, *tokenize_v1(text, turns, str(r[0])))

        def loss_and_hits(batch):
            arrays = {k: torch.from_numpy(v) for k, v in collate([tokenized[r] for r in batch], 0).items()}
            with torch.autocast("cpu", torch.bfloat16):
                logits = learner(arrays["input_ids"], vision_features=feats[[r[0] for r in batch]])
            labels = arrays["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            hits = ((logits[:, :-1].argmax(-1) == labels) | (labels == -100)).all(1).sum().item()
            return loss, hits

    params = [q for q in learner.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    rng, t0 = random.Random(0), time.time()
    print(f"{a.learner}: {len(train)} training questions, {len(scored)} scored; batch {a.batch}, lr {a.lr}")
    for step in range(1, a.steps + 1):
        loss, _ = loss_and_hits(rng.sample(train, a.batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.eval_every == 0:
            learner.eval()
            with torch.no_grad():
                hits = sum(loss_and_hits(scored[i : i + 100])[1] for i in range(0, len(scored), 100))
            learner.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out exact {hits / len(scored):.3f}  ({time.time() - t0:.0f} s)",
                  flush=True)
    if a.save and a.learner == "decoder":
        save_checkpoint(learner, a.save, copy_from=model_dir)


if __name__ == "__main__":
    main()
