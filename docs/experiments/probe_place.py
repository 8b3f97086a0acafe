"""The place probe of docs/REPRODUCTION.md ("Three seeds, and places in stage 1's captions").

A linear probe reads each object's place word (top left, top, ..., 9 classes) from the frozen
tower's layer -2 feature of the patch the object covers most, and from each checkpoint's projector
output of that patch: how much of the place a projector keeps. Training scenes 10,000-11,999 of a
recipe run (1,500 to fit, 500 to score).

    python docs/experiments/probe_place.py runs/default/data runs/default/stage0 runs/default/stage1/final
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llava_rt.checkpoint import load_model
from llava_rt.trainer.data import load_scenes
from llava_rt.trainer.recipe import image_processor_for
from llava_rt.trainer.stages import image_features
from llava_rt.trainer.world import patch_coverage


def probe(features: torch.Tensor, cells: list[tuple[int, int]], labels: torch.Tensor, n_fit: int) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features."""
    z = torch.stack([features[n, p] for n, p in cells]).float()
    z = (z - z[:n_fit].mean(0)) / (z[:n_fit].std(0) + 1e-6)
    w = torch.zeros(z.shape[1], int(labels.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        (F.cross_entropy(z[:n_fit] @ w + b, labels[:n_fit]) + 1e-4 * w.pow(2).sum()).backward()
        opt.step()
    return ((z[n_fit:] @ w + b).argmax(1) == labels[n_fit:]).float().mean().item()


def main(data: Path, models: list[str]) -> None:
    scenes = load_scenes(data)
    ids = [f"{i:06d}" for i in range(10000, 12000)]
    first = load_model(models[0])
    size = first.config.vision_config.image_size
    patch = first.config.vision_config.patch_size
    tower = image_features(first, data, [f"images/{i}.png" for i in ids], image_processor_for(size))
    cells, places = [], []
    for n, sid in enumerate(ids):
        cover = patch_coverage(scenes[sid], size, patch)
        for k, obj in enumerate(scenes[sid].objects):
            cells.append((n, int(cover[k].argmax())))
            places.append(obj.position)
    names = sorted(set(places))
    labels = torch.tensor([names.index(p) for p in places])
    n_fit = sum(1 for n, _ in cells if n < 1500)
    print(f"tower layer features: {probe(tower, cells, labels, n_fit):.3f}")
    for m in models:
        projector = (first if m == models[0] else load_model(m)).multi_modal_projector
        with torch.no_grad():
            out = projector(tower.to(next(projector.parameters()).dtype))
        print(f"{m} projector output: {probe(out, cells, labels, n_fit):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
