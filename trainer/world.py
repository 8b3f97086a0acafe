"""A seeded synthetic visual world: scenes of coloured shapes, their pictures and their symbolic form.

The symbolic form (objects with colour, shape, size, grid position and a bounding box, plus a
caption) plays the part of the paper's teacher input (COCO captions and boxes): every question
and answer is generated from it, so every answer is definitely right.

Pictures vary on purpose (canvas size and aspect ratio, plain, two-tone, gradient or noisy
backgrounds, colour jitter, with or without anti-aliasing, outlines, rotation of the shape
within its cell) so that a model trained on them answers about shapes drawn by other programs.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (215, 38, 38),
    "green": (36, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (140, 50, 185),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
# 3 x 3 grid of the canvas; a scene puts at most one object in a cell, so positions are definite.
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MAX_OBJECTS = 5
BACKGROUNDS = {  # name -> base RGB; light and dark, never one of the object colours
    "white": (245, 245, 245),
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "black": (18, 18, 18),
    "beige": (235, 225, 200),
}


def position_name(row: int, col: int) -> str:
    """'top left', 'top', 'center', 'bottom right', ... ."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    row: int
    col: int
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 in canvas pixels

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[SceneObject] = field(default_factory=list)
    style: dict = field(default_factory=dict)  # rendering choices: gradient, noise, antialias, ...

    def reading_order(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: (o.row, o.col))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = [SceneObject(**{**o, "box": tuple(o["box"])}) for o in d["objects"]]
        return cls(d["width"], d["height"], d["background"], objs, d.get("style", {}))


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    # Aspect ratios from 3:4 to 4:3 and sizes from 96 to 320 px.
    width = rng.randint(96, 320)
    height = int(width * rng.uniform(0.75, 1.333))
    height = max(96, min(320, height))
    n = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = [SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES), r, c) for r, c in cells]
    style = {
        "background_kind": rng.choice(["plain", "plain", "gradient", "noise", "two-tone"]),
        "antialias": rng.random() < 0.7,
        "outline": rng.random() < 0.25,
        "jitter": rng.randint(0, 25),
        "blur": rng.random() < 0.15,
        "seed": rng.randrange(1 << 30),
    }
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), objects, style)


def _jitter(rgb, amount: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def _background(scene: Scene, rng: random.Random, scale: int) -> Image.Image:
    w, h = scene.width * scale, scene.height * scale
    base = np.array(_jitter(BACKGROUNDS[scene.background], 10, rng), dtype=np.float32)
    kind = scene.style.get("background_kind", "plain")
    if kind == "gradient":
        other = base + rng.uniform(-35, 35)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = base[None] * (1 - t[:, None]) + other[None] * t[:, None]
        arr = np.broadcast_to(ramp[None], (h, w, 3)) if ramp.shape[0] == w else np.broadcast_to(ramp[:, None], (h, w, 3))
    elif kind == "noise":
        nrng = np.random.default_rng(scene.style.get("seed", 0))
        arr = base + nrng.normal(0, 12, (h, w, 3)).astype(np.float32)
    elif kind == "two-tone":
        arr = np.broadcast_to(base, (h, w, 3)).copy()
        arr[:, : w // 2] += rng.uniform(-25, 25)
    else:
        arr = np.broadcast_to(base, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.85, y * r * 0.85) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -r), (r * 0.75, 0), (0, r), (-r * 0.75, 0)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render(scene: Scene) -> Image.Image:
    """Draw the scene; fills in each object's bounding box (canvas pixels)."""
    rng = random.Random(scene.style.get("seed", 0))
    scale = 2 if scene.style.get("antialias", True) else 1
    img = _background(scene, rng, scale)
    draw = ImageDraw.Draw(img)
    cell_w, cell_h = scene.width / 3, scene.height / 3
    unit = min(cell_w, cell_h)
    jitter = scene.style.get("jitter", 0)
    for obj in scene.objects:
        r = unit * (rng.uniform(0.18, 0.24) if obj.size == "small" else rng.uniform(0.36, 0.44))
        slack_x, slack_y = max(0.0, cell_w / 2 - r - 2), max(0.0, cell_h / 2 - r - 2)
        cx = (obj.col + 0.5) * cell_w + rng.uniform(-slack_x, slack_x) * 0.6
        cy = (obj.row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y) * 0.6
        fill = _jitter(COLORS[obj.color], jitter, rng)
        outline = _jitter((20, 20, 20) if scene.background not in ("black", "dark gray") else (235, 235, 235), 10, rng)
        width = max(1, int(unit * 0.03)) * scale if scene.style.get("outline") else 0
        s = scale
        if obj.shape == "circle":
            box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
            draw.ellipse(box, fill=fill, outline=outline if width else None, width=width)
        else:
            angle = rng.uniform(-0.25, 0.25) if obj.shape != "diamond" else rng.uniform(-0.1, 0.1)
            pts = [(x * s, y * s) for x, y in _polygon(obj.shape, cx, cy, r, angle)]
            draw.polygon(pts, fill=fill, outline=outline if width else None, width=width)
        obj.box = (int(cx - r), int(cy - r), int(math.ceil(cx + r)), int(math.ceil(cy + r)))
    if scale != 1:
        img = img.resize((scene.width, scene.height), Image.Resampling.LANCZOS)
    if scene.style.get("blur"):
        img = img.filter(ImageFilter.GaussianBlur(0.8))
    return img


def box_in_tower_input(scene: Scene, obj: SceneObject, image_size: int) -> tuple[float, float, float, float]:
    """obj's box in the tower's input pixels: after LLaVA-1.5's pad-to-square (centred) and resize."""
    n = max(scene.width, scene.height)
    left, top, scale = (n - scene.width) // 2, (n - scene.height) // 2, image_size / n
    x0, y0, x1, y1 = obj.box
    return (x0 + left) * scale, (y0 + top) * scale, (x1 + left) * scale, (y1 + top) * scale


def patch_coverage(scene: Scene, image_size: int, patch_size: int, max_objects: int = MAX_OBJECTS) -> np.ndarray:
    """[max_objects, grid * grid]: the share of each object's bounding box that falls in each patch of
    the tower's input, after LLaVA-1.5's pad-to-square (centred) and resize to image_size. Rows of
    absent objects are zero. The base CLIP pools patch features with it (trainer/base_models.py)."""
    grid = image_size // patch_size
    edges = np.arange(grid + 1) * patch_size
    out = np.zeros((max_objects, grid * grid), dtype=np.float32)
    for k, obj in enumerate(scene.objects[:max_objects]):
        x0, y0, x1, y1 = box_in_tower_input(scene, obj, image_size)
        cover_x = np.clip(np.minimum(x1, edges[1:]) - np.maximum(x0, edges[:-1]), 0, None)
        cover_y = np.clip(np.minimum(y1, edges[1:]) - np.maximum(y0, edges[:-1]), 0, None)
        area = np.outer(cover_y, cover_x).reshape(-1)
        out[k] = area / max(area.sum(), 1e-9)
    return out
