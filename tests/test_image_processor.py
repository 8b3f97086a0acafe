"""Image loading and preprocessing: parity with transformers' PIL-backend processors, bad inputs."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from llava_rt.image_processor import (
    ImageProcessorConfig,
    ProcessorError,
    load_image,
    preprocess,
    resize_output_size,
)

clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
llava_pil = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")


def _drawn(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w, 2))
        y0, y1 = sorted(rng.integers(0, h, 2))
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        d.ellipse([x0, y0, x1, y1], fill=colour) if rng.random() < 0.5 else d.rectangle([x0, y0, x1, y1], fill=colour)
    d.line([0, 0, w - 1, h - 1], fill=(255, 255, 255), width=2)
    return img


def _noise(w: int, h: int, seed: int, channels: int = 3) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a, "RGBA" if channels == 4 else "RGB")


def _images() -> dict[str, Image.Image]:
    landscape = _drawn(641, 479, 1)
    portrait = _noise(333, 517, 2)
    p_transparent = landscape.convert("P")
    p_transparent.info["transparency"] = 5
    return {
        "landscape": landscape,
        "portrait": portrait,
        "square": _drawn(224, 224, 3),
        "tiny-tall": _noise(7, 300, 4),
        "tiny-wide": _drawn(300, 7, 5),
        "small-odd": _noise(13, 17, 6),
        "rgba": _noise(71, 50, 7, channels=4),
        "L": portrait.convert("L"),
        "LA": _noise(40, 30, 8, channels=4).convert("LA"),
        "P": landscape.convert("P"),
        "P-transparency": p_transparent,
        "1": portrait.convert("1"),
        "CMYK": landscape.convert("CMYK"),
    }


CONFIGS = {
    "224": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    "336": dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    "28": dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    "hw-then-bigger-crop": dict(size={"height": 30, "width": 20}, crop_size={"height": 32, "width": 24}),
    "short-long-edge": dict(size={"shortest_edge": 40, "longest_edge": 60}, crop_size={"height": 36, "width": 36}),
}


def _reference(kw: dict, do_pad: bool):
    if do_pad:
        return llava_pil.LlavaImageProcessorPil(**kw, do_pad=True)
    return clip_pil.CLIPImageProcessorPil(**kw)


@pytest.mark.parametrize("do_pad", [False, True], ids=["clip", "llava-pad"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_preprocess_matches_transformers(name, do_pad):
    kw = CONFIGS[name]
    ref = _reference(kw, do_pad)
    cfg = ImageProcessorConfig(**kw, do_pad=do_pad)
    images = _images()
    for label, img in images.items():
        want = ref(img, return_tensors="np")["pixel_values"]
        got = preprocess([img], cfg)
        assert got.dtype == np.float32 and got.shape == want.shape, label
        assert np.abs(got - want).max() < 1e-5, label
    # A batch is the per-image results stacked.
    batch = list(images.values())[:4]
    np.testing.assert_allclose(preprocess(batch, cfg), ref(batch, return_tensors="np")["pixel_values"], atol=1e-5, rtol=0)


def test_no_rescale_no_normalize_and_other_resample():
    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 30, "width": 30}, resample=2, do_rescale=False)
    img = _drawn(50, 71, 9)
    want = clip_pil.CLIPImageProcessorPil(**kw)(img, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess(img, ImageProcessorConfig(**kw)), want, atol=1e-5, rtol=0)
    kw = dict(kw, do_normalize=False, do_rescale=True)
    want = clip_pil.CLIPImageProcessorPil(**kw)(img, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess(img, ImageProcessorConfig(**kw)), want, atol=1e-7, rtol=0)


def test_resize_size_truncates_like_transformers():
    # 224 * 517 / 333 = 347.77 -> 347 (int(), not round)
    assert resize_output_size(517, 333, {"shortest_edge": 224}) == (347, 224)
    assert resize_output_size(7, 300, {"shortest_edge": 224}) == (224, 9600)
    assert resize_output_size(10, 20, {"height": 5, "width": 6}) == (5, 6)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    a = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)  # spans 0..64746
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)  # 16-bit grayscale PNG
    rgb = np.asarray(load_image(path))
    expect = np.round(a / 257.0).astype(np.uint8)
    assert rgb.shape == (30, 40, 3)
    np.testing.assert_array_equal(rgb[..., 0], expect)
    # PIL (and therefore transformers) would clip: values above 255 all become white.
    assert (np.asarray(Image.fromarray(a).convert("L")) == 255).mean() > 0.9
    # Through preprocess: same as transformers on the correctly scaled 8-bit image.
    cfg = ImageProcessorConfig(**CONFIGS["28"])
    want = clip_pil.CLIPImageProcessorPil(**CONFIGS["28"])(Image.fromarray(expect), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess([Image.fromarray(a)], cfg), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(preprocess([path], cfg), want, atol=1e-5, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)

    loaded = load_image(path)
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    top = np.asarray(loaded)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(hf_load_image(str(path))))
    # Bytes work too, and preprocess of a path goes through load_image.
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(loaded))
    cfg = ImageProcessorConfig(**CONFIGS["28"])
    np.testing.assert_array_equal(preprocess([path], cfg), preprocess([loaded], cfg))


# ----------------------------------------------------------------------------------------------
# Bad inputs: one ProcessorError naming the source and the cause


def _png_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    _drawn(w, h, 11).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header_size(w: int, h: int) -> bytes:
    data = bytearray(_png_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_missing_file(tmp_path):
    with pytest.raises(ProcessorError, match=r"nope\.png.*not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(ProcessorError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file_and_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ProcessorError, match=r"empty\.jpg.*empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ProcessorError, match="empty"):
        load_image(b"")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG\n" * 10)
    with pytest.raises(ProcessorError, match=r"notes\.jpg.*not an image"):
        load_image(path)


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    _noise(200, 150, 12).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ProcessorError, match=r"cut\.jpg.*corrupt or truncated"):
        load_image(path)
    png = _png_bytes(200, 150)
    with pytest.raises(ProcessorError, match="corrupt or truncated"):
        load_image(png[: len(png) // 2])


def test_corrupt_image_data(tmp_path):
    png = bytearray(_png_bytes(200, 150))
    idat = png.index(b"IDAT")
    png[idat + 40 : idat + 80] = bytes(40)  # break the compressed stream / CRC
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(png))
    with pytest.raises(ProcessorError, match=r"bad\.png.*corrupt or truncated"):
        load_image(path)


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    # A header claiming 10000 x 10000 (100 M pixels, over our default 50 M) with almost no data.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(10_000, 10_000))
    with pytest.raises(ProcessorError, match=r"bomb\.png.*10000x10000.*over the limit"):
        load_image(path)
    # Beyond PIL's own decompression-bomb limit: PIL refuses it at open; same kind of message.
    with pytest.raises(ProcessorError, match="too large"):
        load_image(_png_with_header_size(40_000, 40_000))
    # The limit is a parameter.
    with pytest.raises(ProcessorError, match="over the limit of 1000"):
        load_image(_png_bytes(64, 48), max_pixels=1000)
    assert load_image(_png_bytes(64, 48), max_pixels=64 * 48).size == (64, 48)


def test_zero_size_image():
    with pytest.raises(ProcessorError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_unsupported_source_type():
    with pytest.raises(ProcessorError, match="cannot load an image from int"):
        load_image(42)


def test_extreme_aspect_ratio_is_refused():
    cfg = ImageProcessorConfig(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    with pytest.raises(ProcessorError, match="aspect ratio"):
        preprocess([Image.new("RGB", (1, 200_000))], cfg)


def test_different_output_sizes_need_a_crop():
    cfg = ImageProcessorConfig(size={"shortest_edge": 28}, do_center_crop=False)
    assert cfg.output_size is None
    with pytest.raises(ProcessorError, match="different sizes"):
        preprocess([_drawn(40, 30, 1), _drawn(30, 40, 2)], cfg)
    assert preprocess([_drawn(40, 30, 1)], cfg).shape == (1, 3, 28, 37)


# ----------------------------------------------------------------------------------------------
# Config files


def test_config_round_trip_and_transformers_reads_it(tmp_path):
    from transformers import AutoImageProcessor

    img = _drawn(90, 61, 13)
    for do_pad in (False, True):
        cfg = ImageProcessorConfig(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}, do_pad=do_pad)
        d = tmp_path / f"pad{do_pad}"
        cfg.save(d)
        assert ImageProcessorConfig.load(d) == cfg
        hf = AutoImageProcessor.from_pretrained(d)
        assert type(hf).__name__ == ("LlavaImageProcessorPil" if do_pad else "CLIPImageProcessorPil")
        np.testing.assert_allclose(preprocess([img], cfg), hf(img, return_tensors="np")["pixel_values"], atol=1e-5, rtol=0)


def test_load_transformers_written_files(tmp_path):
    hf = llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}, do_pad=True)
    hf.save_pretrained(tmp_path)
    cfg = ImageProcessorConfig.load(tmp_path)
    assert cfg.do_pad and cfg.size == {"shortest_edge": 30} and cfg.crop_size == {"height": 28, "width": 28}
    # transformers 5's LlavaProcessor nests the image processor inside processor_config.json instead.
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": hf.to_dict(), "patch_size": 14}))
    assert ImageProcessorConfig.load(nested) == cfg


def test_legacy_int_sizes():
    cfg = ImageProcessorConfig.from_dict({"size": 336, "crop_size": 336, "image_processor_type": "CLIPImageProcessor"})
    assert cfg.size == {"shortest_edge": 336} and cfg.crop_size == {"height": 336, "width": 336}
    assert cfg.output_size == (336, 336)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ProcessorError, match="preprocessor_config.json not found"):
        ImageProcessorConfig.load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{ not json")
    with pytest.raises(ProcessorError, match="preprocessor_config.json is not readable JSON"):
        ImageProcessorConfig.load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 3}}))
    with pytest.raises(ProcessorError, match=r"preprocessor_config.json.*size="):
        ImageProcessorConfig.load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ProcessorError, match="image_mean must have 3 values"):
        ImageProcessorConfig.load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": "bicubic"}))
    with pytest.raises(ProcessorError, match="preprocessor_config.json"):
        ImageProcessorConfig.load(tmp_path)


def test_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, llava_rt.image_processor, llava_rt.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
