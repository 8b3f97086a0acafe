"""Image loading and preprocessing for the vision tower: PIL + numpy, no torch.

Numerically identical to transformers' PIL-backend CLIPImageProcessor / LlavaImageProcessor
(transformers 5.x `image_processing_backends.PilBackend`): the same resize size arithmetic,
PIL resampling on uint8 RGB, zero-padded center crop, rescale in float64 then float32, and
normalize in float32. The onnxruntime path uses this module, so it must never import torch.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers 5 nests the image processor in here

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Decoded-pixel budget per image; PIL reads the header first, so a bomb is refused before decoding.
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ProcessorError(ValueError):
    """A user-fixable problem with an image, a prompt or a processor config."""


@dataclass
class ImageProcessorConfig:
    """Fields of transformers' CLIPImageProcessor / LlavaImageProcessor preprocessor_config.json.

    Defaults are transformers' class defaults, so a partial file means what it means there.
    `do_pad` is LLaVA-1.5's pad-to-square (background = the mean colour) before resizing.
    """

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    do_convert_rgb: bool = True
    do_pad: bool = False

    def __post_init__(self) -> None:
        self.size = _size_dict(self.size, "size", square=False)
        self.crop_size = _size_dict(self.crop_size, "crop_size", square=True)
        self.image_mean = _channel_list(self.image_mean, "image_mean")
        self.image_std = _channel_list(self.image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ProcessorError(f"image_std {self.image_std} contains 0; every channel needs a non-zero std")
        if int(self.resample) not in range(6):
            raise ProcessorError(f"resample={self.resample!r} is not a PIL filter id (0..5; 3 is bicubic)")
        self.resample = int(self.resample)
        self.rescale_factor = float(self.rescale_factor)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None when it depends on the input."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        # Unknown keys (image_processor_type, processor_class, ...) are bookkeeping; ignore them.
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in d.items() if k in names and v is not None})
        except ProcessorError:
            raise
        except (TypeError, ValueError) as e:
            raise ProcessorError(
                f"malformed image processor config ({e}); fix or regenerate preprocessor_config.json"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.do_pad:
            del d["do_pad"]  # CLIPImageProcessor has no pad-to-square; keep its file plain
        d["image_processor_type"] = "LlavaImageProcessor" if self.do_pad else "CLIPImageProcessor"
        return d

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> ImageProcessorConfig:
        """Read preprocessor_config.json, or the image_processor entry of transformers 5's processor_config.json."""
        model_dir = Path(model_dir)
        path = model_dir / PREPROCESSOR_FILE
        if path.is_file():
            return _from_file(cls, path, _read_json(path))
        alt = model_dir / PROCESSOR_FILE
        if alt.is_file():
            d = _read_json(alt)
            if isinstance(d.get("image_processor"), dict):
                return _from_file(cls, alt, d["image_processor"])
        raise ProcessorError(
            f"{path} not found (nor an 'image_processor' entry in {alt}); the model directory needs the "
            f"image preprocessing settings: copy preprocessor_config.json from the checkpoint, or write one "
            f"with ImageProcessorConfig(...).save(model_dir)"
        )

    def save(self, model_dir: str | os.PathLike) -> Path:
        path = Path(model_dir) / PREPROCESSOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorError(f"{path} is not readable JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(d, dict):
        raise ProcessorError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _from_file(cls: type[ImageProcessorConfig], path: Path, d: dict[str, Any]) -> ImageProcessorConfig:
    try:
        return cls.from_dict(d)
    except ProcessorError as e:
        raise ProcessorError(f"{path}: {e}") from None


def _size_dict(v: Any, name: str, square: bool) -> dict[str, int]:
    # transformers' get_size_dict: an int means the shortest edge for `size` (CLIP's
    # default_to_square=False) and a square for `crop_size`.
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = {"height": int(v), "width": int(v)} if square else {"shortest_edge": int(v)}
    if isinstance(v, (list, tuple)) and len(v) == 2:
        v = {"height": v[0], "width": v[1]}
    if not isinstance(v, dict):
        raise ProcessorError(
            f"{name} must be a dict like {{'shortest_edge': 336}} or {{'height': 336, 'width': 336}}, got {v!r}"
        )
    v = {k: int(x) for k, x in v.items() if x is not None}
    ok = ("shortest_edge" in v and set(v) <= {"shortest_edge", "longest_edge"}) or set(v) == {"height", "width"}
    if square and set(v) != {"height", "width"}:
        ok = False
    if not ok or any(x <= 0 for x in v.values()):
        want = "{'height': H, 'width': W}" if square else "{'shortest_edge': N} or {'height': H, 'width': W}"
        raise ProcessorError(f"{name}={v} is not supported; use {want} with positive ints")
    return v


def _channel_list(v: Any, name: str) -> list[float]:
    if isinstance(v, (int, float)):
        v = [float(v)] * 3
    v = [float(x) for x in v]
    if len(v) != 3:
        raise ProcessorError(f"{name} must have 3 values (R, G, B), got {v}")
    return v


# ----------------------------------------------------------------------------------------------
# Loading


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"in-memory image ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode} {source.width}x{source.height})"
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    return f"image source of type {type(source).__name__}"


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to 8-bit RGB.

    Every user-caused failure (missing path, directory, empty/corrupt/truncated/non-image file,
    zero-size or over-`max_pixels` image) raises one ProcessorError naming the source.
    """
    what = _describe(source)
    if isinstance(source, Image.Image):
        return _decode(source, what, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ProcessorError(f"{what} is empty; pass the bytes of a JPEG/PNG/WebP/... file")
        fp: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ProcessorError(f"{what} is a directory; pass the path of an image file")
        if not path.is_file():
            raise ProcessorError(f"{what} not found; check the path")
        if path.stat().st_size == 0:
            raise ProcessorError(f"{what} is empty (0 bytes); re-save or re-download the image")
        fp = path
    else:
        raise ProcessorError(f"cannot load an image from {type(source).__name__}; pass a path, bytes or a PIL image")
    try:
        with warnings.catch_warnings():
            # We apply our own (lower) limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(fp)  # reads the header only
    except UnidentifiedImageError:
        raise ProcessorError(f"{what} is not an image PIL can read; convert it to PNG or JPEG") from None
    except Image.DecompressionBombError:
        raise ProcessorError(
            f"{what} is too large to decode safely (over {max_pixels} pixels); downscale it first"
        ) from None
    except OSError as e:
        raise ProcessorError(f"{what} cannot be opened ({e})") from None
    with opened:
        img = _decode(opened, what, max_pixels)
        # Detach from the file (multi-frame formats keep it open otherwise).
        return img.copy() if img is opened else img


def _decode(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w == 0 or h == 0:
        raise ProcessorError(f"{what} has zero size ({w}x{h}); pass a non-empty image")
    if w * h > max_pixels:
        raise ProcessorError(
            f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; downscale it first "
            f"or raise max_pixels"
        )
    try:
        img.load()  # the actual decode: truncated or corrupt data fails here
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ProcessorError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad data
        raise ProcessorError(f"{what} is corrupt or truncated ({e}); re-save or re-download the image") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as transformers' `convert_to_rgb` does.

    Transparency is composited onto white (as transformers' image processors do). One deliberate
    difference: 16/32-bit integer images (I;16*, I) are scaled to 8 bits; PIL, and so
    transformers, would clip every value above 255 and return a nearly white image.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        if img.mode == "I" and a.max(initial=0) <= 255:
            a8 = a.clip(0, 255).astype(np.uint8)  # 8-bit data that PIL stored as 32-bit
        else:
            a8 = np.round(a.clip(0, 65535) / 257.0).astype(np.uint8)  # 65535 -> 255 exactly
        return Image.fromarray(a8).convert("RGB")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ProcessorError(f"cannot convert a {img.mode} image to RGB ({e}); save it as an RGB PNG or JPEG") from None


# ----------------------------------------------------------------------------------------------
# Preprocessing


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """(height, width) after resizing, with transformers' integer arithmetic."""
    if "height" in size:
        return size["height"], size["width"]
    if "longest_edge" in size:
        return _size_with_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
    # get_resize_output_image_size(default_to_square=False): truncate, don't round
    target = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    # transformers.image_transforms.get_size_with_aspect_ratio, line for line
    raw_size = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * size > max_size:
        raw_size = max_size * lo / hi
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def pad_to_square(a: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """LLaVA-1.5 expand2square on an HWC uint8 array: centre the image on a square of `background`."""
    h, w = a.shape[:2]
    if h == w:
        return a
    n = max(h, w)
    out = np.empty((n, n, a.shape[2]), dtype=a.dtype)
    out[...] = np.asarray(background, dtype=a.dtype)
    if w > h:
        top = (n - h) // 2
        out[top : top + h] = a
    else:
        left = (n - w) // 2
        out[:, left : left + w] = a
    return out


def center_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on HWC: floor offsets; an image smaller than the crop is zero-padded."""
    h, w = a.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    bottom, right = top + height, left + width
    if top >= 0 and bottom <= h and left >= 0 and right <= w:
        return a[top:bottom, left:right]
    nh, nw = max(height, h), max(width, w)
    out = np.zeros((nh, nw) + a.shape[2:], dtype=a.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[tp : tp + h, lp : lp + w] = a
    top, bottom, left, right = top + tp, bottom + tp, left + lp, right + lp
    return out[max(0, top) : min(nh, bottom), max(0, left) : min(nw, right)]


def _resized_uint8(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image through RGB, pad-to-square, resize and crop; HWC uint8."""
    img = to_rgb(img)
    if cfg.do_pad:
        bg = tuple(int(x * 255) for x in cfg.image_mean)
        img = Image.fromarray(pad_to_square(np.asarray(img), bg))
    if cfg.do_resize:
        oh, ow = resize_output_size(img.height, img.width, cfg.size)
        if oh * ow > DEFAULT_MAX_PIXELS:
            raise ProcessorError(
                f"a {img.width}x{img.height} image would be resized to {ow}x{oh}; its aspect ratio is too "
                f"extreme for shortest-edge resizing, crop or pad it first"
            )
        img = img.resize((ow, oh), resample=cfg.resample)
    a = np.asarray(img)
    if cfg.do_center_crop:
        a = center_crop(a, cfg.crop_size["height"], cfg.crop_size["width"])
    return a


def preprocess(
    images: Sequence[ImageSource] | ImageSource,
    cfg: ImageProcessorConfig,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Images -> float32 pixel values [N, 3, H, W] for the vision tower.

    PIL images are used as given (like transformers' image processor, no EXIF transpose);
    paths and bytes go through `load_image` first (EXIF transpose, RGB).
    """
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        images = [images]
    if len(images) == 0:
        raise ProcessorError("preprocess got no images; pass at least one")
    arrays = []
    for src in images:
        img = src if isinstance(src, Image.Image) else load_image(src, max_pixels=max_pixels)
        arrays.append(_resized_uint8(img, cfg))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ProcessorError(
            f"images have different sizes after preprocessing {sorted(shapes)}; enable do_center_crop or use "
            f"size {{'height': H, 'width': W}} so every image comes out the same size"
        )
    batch = np.stack(arrays)  # [N, H, W, 3] uint8
    # Same dtype steps as transformers: rescale in float64 then cast, normalize in float32.
    if cfg.do_rescale:
        x = (batch.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = batch.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
