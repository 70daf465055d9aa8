"""Image preprocessing: pixel parity with transformers' *Pil processors, AnyRes geometry and token
counts against LLaVA-NeXT's own unpad arithmetic, and safe loading of untrusted bytes."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from llavakit.config import ImageConfig, VisionConfig
from llavakit.geometry import select_best_resolution
from llavakit.processing.image import (
    ImageError,
    anyres_grid,
    clip_transform,
    expand2square,
    load_image,
    num_image_tokens,
    preprocess,
)
from llavakit.processing.media import MediaError

SIZES_WH = [(640, 480), (480, 640), (10, 7), (2000, 1500), (336, 336), (1024, 899), (1, 300)]


def pinpoints(s: int) -> list[tuple[int, int]]:
    """The LLaVA-1.6 pinpoint set scaled to tile size s."""
    return [(s, 2 * s), (2 * s, s), (2 * s, 2 * s), (3 * s, s), (s, 3 * s)]


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "RGBA":
        arr[: h // 2, :, 3] = 0  # fully transparent top half, so compositing shows
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)


def hf_kwargs(s: int) -> dict:
    return dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def hf_pixels(processor, img: Image.Image) -> np.ndarray:
    return np.asarray(processor(img, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("s", [336, 28])
@pytest.mark.parametrize("wh", SIZES_WH)
def test_crop_and_pad_match_transformers(s, wh):
    img = noise(*wh)
    crop, size = preprocess(img, ImageConfig(mode="crop", size=s, crop_size=s))
    assert size == (wh[1], wh[0])
    ref = hf_pixels(CLIPImageProcessorPil(**hf_kwargs(s)), img)
    torch.testing.assert_close(crop, torch.from_numpy(ref), atol=1e-5, rtol=0)
    pad, _ = preprocess(img, ImageConfig(mode="pad", size=s, crop_size=s))
    ref = hf_pixels(LlavaImageProcessorPil(do_pad=True, **hf_kwargs(s)), img)
    torch.testing.assert_close(pad, torch.from_numpy(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("s", [336, 28])
@pytest.mark.parametrize("wh", SIZES_WH)
def test_anyres_matches_transformers(s, wh):
    img = noise(*wh, seed=1)
    cfg = ImageConfig(mode="anyres", size=s, crop_size=s, pinpoints=pinpoints(s))
    pixels, size = preprocess(img, cfg)
    out = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints(s)], **hf_kwargs(s))(
        img, return_tensors="np")
    torch.testing.assert_close(pixels, torch.from_numpy(out["pixel_values"][0]), atol=1e-5, rtol=0)
    assert list(size) == list(out["image_sizes"][0])
    rows, cols = anyres_grid(size, cfg)
    assert pixels.shape == (1 + rows * cols, 3, s, s)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_other_modes_match_transformers(mode):
    img = noise(50, 37, "RGB" if mode == "P" else mode, seed=2)
    if mode == "P":
        img = img.quantize(16)
        img.info["transparency"] = 3
    cases = [(ImageConfig(mode="crop", size=28, crop_size=28), CLIPImageProcessorPil(**hf_kwargs(28))),
             (ImageConfig(mode="pad", size=28, crop_size=28), LlavaImageProcessorPil(do_pad=True, **hf_kwargs(28)))]
    for ours_cfg, ref in cases:
        pixels, _ = preprocess(img, ours_cfg)
        torch.testing.assert_close(pixels, torch.from_numpy(hf_pixels(ref, img)), atol=1e-5, rtol=0)


def test_crop_larger_than_resize_pads_like_transformers():
    img = noise(30, 20)
    ours = clip_transform(img, ImageConfig(mode="crop", size=20, crop_size=28))
    ref = hf_pixels(CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 28, "width": 28}), img)
    np.testing.assert_allclose(ours, ref[0], atol=1e-5, rtol=0)


def test_transparent_pixels_become_white():
    img = load_image(_png_bytes(noise(8, 6, "RGBA")))
    assert img.mode == "RGB"
    assert np.all(np.asarray(img)[:3] == 255)


def test_pad_shrinks_a_very_long_image_before_padding_it(monkeypatch):
    """A 4100 x 200 image would pad to 4100² pixels: it is halved first (box filter), so the square has at most
    PAD_MAX_SIDE² pixels, and the pixels stay within a few levels of transformers' full-size padding."""
    from llavakit.processing import image as image_module

    y, x = np.mgrid[0:200, 0:4100]
    img = Image.fromarray(np.stack([x * 255 // 4099, y * 255 // 199, (x + y) % 256], -1).astype(np.uint8))
    squares = []
    real = image_module.expand2square
    monkeypatch.setattr(image_module, "expand2square", lambda im, fill: squares.append(im.size) or real(im, fill))
    ours, size = preprocess(img, ImageConfig(mode="pad", size=336, crop_size=336))
    assert size == (200, 4100) and squares == [(2050, 100)] and max(squares[0]) <= image_module.PAD_MAX_SIDE
    ref = hf_pixels(LlavaImageProcessorPil(do_pad=True, **hf_kwargs(336)), img)
    assert (ours - torch.from_numpy(ref)).abs().max() < 0.05  # normalized units: about 2 of 255 levels


def test_expand2square_centers_on_fill():
    img = Image.new("RGB", (5, 2), (10, 20, 30))
    sq = np.asarray(expand2square(img, (122, 116, 104)))
    assert sq.shape == (5, 5, 3)
    assert (sq[:, :, 0] == 10).sum(axis=1).tolist() == [0, 5, 5, 0, 0]  # offset (5 - 2) // 2 = 1
    assert tuple(sq[0, 0]) == (122, 116, 104)
    tall = np.asarray(expand2square(Image.new("RGB", (2, 5), (10, 20, 30)), (0, 0, 0)))
    assert (tall[:, :, 0] == 10).sum(axis=0).tolist() == [0, 5, 5, 0, 0]


def test_select_best_resolution_matches_transformers():
    rng = np.random.default_rng(3)
    pp = pinpoints(336)
    for h, w in rng.integers(1, 3000, (300, 2)).tolist():
        assert select_best_resolution((h, w), pp) == tuple(hf_select_best_resolution((h, w), pp))
    assert select_best_resolution((899, 1024), pp) == (672, 672)


VISION = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14)
ANYRES = ImageConfig(mode="anyres", pinpoints=pinpoints(336))


def test_spec_token_vectors():
    assert anyres_grid((899, 1024), ANYRES) == (2, 2)
    assert num_image_tokens((899, 1024), VISION, ANYRES, merge="spatial_unpad") == 2634
    assert num_image_tokens((480, 640), VISION, ANYRES, merge="spatial_unpad") == 2340


def reference_tokens(h: int, w: int) -> int:
    """Count what LLaVA-NeXT's own unpad_image keeps of a dummy feature grid, plus newlines and base."""
    rows, cols = get_anyres_image_grid_shape((h, w), [list(p) for p in pinpoints(336)], 336)
    grid = torch.zeros(1, rows * 24, cols * 24)
    kept = unpad_image(grid, (h, w))
    return 576 + kept.shape[1] * kept.shape[2] + kept.shape[1]


def test_token_count_matches_unpad_image_for_random_sizes():
    rng = np.random.default_rng(4)
    # (55, 176), (88, 99), (47, 1128): the float product sits just under an integer, so the
    # count is only right with unpad_image's round(x, 7) before int().
    fixed = [[1, 4000], [4000, 1], [899, 1024], [1500, 2000], [55, 176], [88, 99], [47, 1128]]
    sizes = rng.integers(1, 4000, (400, 2)).tolist() + fixed
    hf_pinpoints = [list(p) for p in pinpoints(336)]
    for h, w in sizes:
        assert anyres_grid((h, w), ANYRES) == get_anyres_image_grid_shape((h, w), hf_pinpoints, 336)
        assert num_image_tokens((h, w), VISION, ANYRES, merge="spatial_unpad") == reference_tokens(h, w), (h, w)


def test_token_counts_for_other_modes():
    pad = ImageConfig(mode="pad")
    assert num_image_tokens((480, 640), VISION, pad) == 576
    assert num_image_tokens((480, 640), VISION, pad, feature_select="full") == 577
    assert num_image_tokens((480, 640), VISION, pad, merge="spatial_unpad") == 577  # the original's newline
    assert num_image_tokens((480, 640), VISION, ANYRES, merge="flat") == 5 * 576
    assert num_image_tokens((480, 640), VISION, ANYRES, merge="spatial") == 576 + 4 * 576
    with pytest.raises(ValueError, match="feature_select"):
        num_image_tokens((480, 640), VISION, ANYRES, feature_select="full", merge="spatial")
    with pytest.raises(ValueError, match="merge"):
        num_image_tokens((480, 640), VISION, ANYRES, merge="pool")


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    img.save(path, format="JPEG", exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert load_image(str(path)).size == (20, 40)


def test_sources_bytes_data_url_path(tmp_path):
    raw = _png_bytes(Image.new("RGB", (3, 2), (1, 2, 3)))
    (tmp_path / "a.png").write_bytes(raw)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    for source in (raw, url, tmp_path / "a.png", str(tmp_path / "a.png"), Image.open(io.BytesIO(raw))):
        img = load_image(source)
        assert img.size == (3, 2) and img.getpixel((0, 0)) == (1, 2, 3)


def test_gif_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def test_undecodable_and_truncated_bytes_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(b"definitely not an image")
    jpeg = _png_bytes(noise(64, 64), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_disallowed_format_is_refused():
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(_png_bytes(noise(8, 8), "TIFF"))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageError, match="pixel"):
        load_image(_png_header_only(9000, 8000))  # 72M > 64M default, under PIL's own limit
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(_png_header_only(100_000, 100_000))  # PIL's DecompressionBombError, converted
    with pytest.raises(ImageError, match="over the 5000-pixel limit"):
        load_image(_png_bytes(noise(100, 100)), max_pixels=5000)
    with pytest.raises(ImageError, match="over the 5000-pixel limit"):
        load_image(noise(100, 100), max_pixels=5000)


def test_missing_path_and_bad_type():
    with pytest.raises(MediaError, match="nope.png"):
        load_image("/definitely/missing/nope.png")
    with pytest.raises(TypeError, match="int"):
        load_image(123)
