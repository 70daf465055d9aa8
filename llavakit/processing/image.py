"""CPU image preprocessing for LLaVA: loading untrusted images safely, the CLIP transform, LLaVA-1.5
`pad` (expand2square), LLaVA-NeXT AnyRes tiling, and the image-token count known from the size alone.

Sizes are (height, width) throughout this module's API, like transformers' `image_sizes`; PIL itself
speaks (width, height), so conversions happen at the PIL calls. Pixel values match transformers'
CLIPImageProcessorPil / LlavaImageProcessorPil / LlavaNextImageProcessorPil (SPEC §2, §3).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from llavakit import geometry
from llavakit.config import ImageConfig, VisionConfig
from llavakit.geometry import fit_size, select_best_resolution, unpad_shape
from llavakit.processing.media import FetchPolicy, read_source

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


class ImageError(ValueError):
    """An image could not be used; the message names the source and what to do."""


def _describe(source: object) -> str:
    """Name a source in an error message without echoing a whole data: URL or byte string."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    if text[:5].lower() == "data:":
        return f"data URL ({len(text)} chars)"
    return text if len(text) <= 100 else text[:100] + "..."


def _read_bytes(source: object, policy: FetchPolicy | None) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        return read_source(str(source), policy)
    raise TypeError(f"image source must be a path, URL, data: URL, bytes or PIL image, "
                    f"got {type(source).__name__}")


def _check_pixels(size_wh: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size_wh
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name} has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"image {name} is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit; "
                         "send a smaller image or raise max_pixels")


def _decode(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Open, check the header's size, then decode — so a decompression bomb is refused unread."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"image {name} declares too many pixels (decompression bomb); "
                         "send a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageError(f"image {name} could not be decoded; send a valid "
                         f"{', '.join(ALLOWED_FORMATS)} file") from None
    _check_pixels(img.size, max_pixels, name)
    try:
        img.load()  # GIF/WEBP: frame 0 only
        ImageOps.exif_transpose(img, in_place=True)  # a copy of every pixel otherwise, rotated or not
        return img
    except Exception:  # noqa: BLE001 - decoders of untrusted bytes raise many types; none may escape
        raise ImageError(f"image {name} is truncated or corrupt and could not be decoded; "
                         "send the complete file") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any alpha or palette transparency composited onto white (as transformers does)."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image, policy: FetchPolicy | None = None,
               max_pixels: int = 64_000_000) -> Image.Image:
    """Load an RGB image from a path, http(s) URL, data: URL, raw bytes or PIL image: the pixel count
    is checked before decoding, EXIF orientation is applied, transparency becomes white."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name)
        return to_rgb(ImageOps.exif_transpose(source))
    img = _decode(_read_bytes(source, policy), max_pixels, name)
    return to_rgb(img)


# Longer side above which `pad` first shrinks the image by a whole factor (a box filter) before padding it: the
# square then holds at most 4096² pixels (48 MiB) instead of longer_side² (4.8 GB for a 40000 x 400 image). The
# CLIP resize to 336 that follows hides the difference but for the last bits of the pixel values.
PAD_MAX_SIDE = 4096


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5 `pad`: paste the image centered on a square canvas of `fill`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the short side = size and the long side int(size * long / short), truncated."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """Center crop (H, W, C) to (crop, crop); a side shorter than the crop is zero-padded, the image
    placed at ceil(pad / 2) as transformers' center_crop does."""
    h, w = arr.shape[:2]
    out_h, out_w = max(h, crop), max(w, crop)
    if (out_h, out_w) != (h, w):
        padded = np.zeros((out_h, out_w, arr.shape[2]), dtype=arr.dtype)
        top, left = math.ceil((out_h - h) / 2), math.ceil((out_w - w) / 2)
        padded[top:top + h, left:left + w] = arr
        arr, h, w = padded, out_h, out_w
    top, left = (h - crop) // 2, (w - crop) // 2
    return arr[top:top + crop, left:left + crop]


def clip_transform(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """CLIP steps on an RGB image: bicubic resize of the shortest edge to cfg.size, center crop
    cfg.crop_size, rescale, normalize. Returns float32 (3, crop, crop)."""
    new_h, new_w = _shortest_edge_size(img.height, img.width, cfg.size)
    arr = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    arr = _center_crop(arr, cfg.crop_size)
    # Rescale in float64 then normalize in float32: the same rounding as transformers.
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


def _anyres_canvas(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The image resized to fit `target` and centered on a black canvas of that size."""
    th, tw = target
    new_h, new_w = fit_size((img.height, img.width), target)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC), ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def anyres_tiles(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """AnyRes pixel values (1 + rows*cols, 3, crop, crop): the squashed whole image first, then the
    tiles of the padded best-resolution canvas, row-major."""
    target = select_best_resolution((img.height, img.width), cfg.pinpoints)
    canvas = _anyres_canvas(img, target)
    tile = cfg.crop_size
    boxes = [(x, y, min(x + tile, canvas.width), min(y + tile, canvas.height))
             for y in range(0, canvas.height, tile) for x in range(0, canvas.width, tile)]
    base = img.resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)
    views = [base] + [canvas.crop(box) for box in boxes]
    return np.stack([clip_transform(view, cfg) for view in views])


def preprocess(img: Image.Image, cfg: ImageConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixel values (N, 3, S, S) float32 for cfg.mode (N = 1 for pad and crop) and the image's
    original (height, width)."""
    img = to_rgb(img)
    if cfg.mode == "anyres":
        pixels = anyres_tiles(img, cfg)
    elif cfg.mode == "pad":
        factor = -(-max(img.size) // PAD_MAX_SIDE)
        small = img.reduce(factor) if factor > 1 else img
        pixels = clip_transform(expand2square(small, cfg.pad_color), cfg)[None]
    else:
        pixels = clip_transform(img, cfg)[None]
    return torch.from_numpy(pixels), (img.height, img.width)


def anyres_grid(image_size_hw: tuple[int, int], cfg: ImageConfig) -> tuple[int, int]:
    """(rows, cols) of AnyRes tiles for an image of this (height, width)."""
    return geometry.anyres_grid(image_size_hw, cfg.pinpoints, cfg.crop_size)


def num_image_tokens(image_size_hw: tuple[int, int], vision: VisionConfig, cfg: ImageConfig,
                     feature_select: str = "default", merge: str = "flat") -> int:
    """Image features the model produces for an image of this (height, width), before it runs.
    `merge` is the patch merge type: flat, spatial (tiles in grid order, no newlines, as the original
    LLaVA-NeXT code does) or spatial_unpad (unpadded grid plus one newline per row)."""
    if merge not in MERGE_TYPES:
        raise ValueError(f"merge must be one of {MERGE_TYPES}, got {merge!r}")
    grid = vision.grid_size
    per_tile = grid * grid + (feature_select == "full")
    if cfg.mode != "anyres":  # one tile; the original still ends it with a newline under spatial_unpad
        return per_tile + (merge == "spatial_unpad")
    rows, cols = anyres_grid(image_size_hw, cfg)
    if merge == "flat":
        return (1 + rows * cols) * per_tile
    if feature_select == "full":
        raise ValueError("spatial AnyRes merging needs feature_select 'default' (the CLS token has no "
                         "place in the grid); use merge 'flat' or feature_select 'default'")
    if merge == "spatial":
        return per_tile + rows * cols * per_tile
    top, bottom, left, right = unpad_shape(image_size_hw, (rows * grid, cols * grid))
    h, w = bottom - top, right - left
    return per_tile + h * w + h
