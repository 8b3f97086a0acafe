"""The attribute probe of docs/REPRODUCTION.md ("Why the vision tower, and what moved it").

A linear probe reads each object's colour, shape and size from the frozen tower's layer -2
patch features, averaged over the patches its box covers (weighted by `patch_coverage`) and from
the one patch it covers most (what the decoder looks up), for each checkpoint given: how well a
base CLIP encodes what the decoder must find. Training scenes
10,000-11,999 of a recipe run (1,500 to fit, 500 to score), as in probe_place.py.

    python docs/experiments/probe_tower.py runs/default/data runs/default/stage0 runs/other/stage0
"""

import sys
from pathlib import Path

import torch

from llava_rt.checkpoint import load_model
from llava_rt.trainer.data import load_scenes
from llava_rt.trainer.recipe import image_processor_for
from llava_rt.trainer.stages import image_features
from llava_rt.trainer.world import patch_coverage
from probe_place import probe


def main(data: Path, models: list[str]) -> None:
    scenes = load_scenes(data)
    ids = [f"{i:06d}" for i in range(10000, 12000)]
    for m in models:
        model = load_model(m)
        size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
        tower = image_features(model, data, [f"images/{i}.png" for i in ids], image_processor_for(size)).float()
        pooled, best, objects, fit = [], [], [], 0
        for n, sid in enumerate(ids):
            cover = torch.from_numpy(patch_coverage(scenes[sid], size, patch))
            for k, obj in enumerate(scenes[sid].objects):
                pooled.append(cover[k] @ tower[n] / cover[k].sum())
                best.append(tower[n, int(cover[k].argmax())])
                objects.append(obj)
                fit += n < 1500
        features = torch.stack([torch.stack(pooled), torch.stack(best)], 1)  # [objects, 2, hidden]
        scores = []
        for attribute in ("color", "shape", "size"):
            values = [getattr(o, attribute) for o in objects]
            names = sorted(set(values))
            labels = torch.tensor([names.index(v) for v in values])
            pooled_acc, best_acc = (probe(features, [(i, j) for i in range(len(objects))], labels, fit) for j in (0, 1))
            scores.append(f"{attribute} {pooled_acc:.3f} / {best_acc:.3f}")
        print(m, "(pooled / best patch):", ", ".join(scores))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
