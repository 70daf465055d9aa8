"""Grounding: boxes parsed from a model's answer, mapped back onto the original picture and drawn.

LLaVA-1.5 answers "where is X?" with "[x1, y1, x2, y2]" in 0-1 coordinates of the PADDED SQUARE image it
saw (expand2square: the picture pasted centered on a max(W, H) square at ((side - W) // 2, (side - H) // 2)).
`square_to_image` undoes that padding; `image_to_square` is its inverse. Seed 000's answer is
"0.23, 0.33, 0.79, 0.78" (no brackets), so bare quadruples are boxes too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from llavakit.processing.image import load_image

Box = tuple[float, float, float, float]

_NUM = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
# A run of comma-separated numbers; a box is a run of exactly four. Brackets end a run, so
# "[0.1, 0.2, 0.3, 0.4], [0.5, ...]" gives two runs, while a longer bare list ("1, 2, 3, 4, 5") is no box.
_RUN_RE = re.compile(_NUM + r"(?:\s*,\s*" + _NUM + r")+")


def _normalise(values: Box) -> Box | None:
    """Scale rule, per box: every value <= 1 -> already 0-1; largest value <= 1000 -> 0-1000 scale
    (Qwen-VL style), divided by 1000; anything larger, or any negative value -> not a box. Boxes with
    x2 <= x1 or y2 <= y1 are dropped, not repaired: swapping or widening them would invent a location the
    model never gave."""
    top = max(values)
    if top > 1000 or min(values) < 0:
        return None
    scale = 1.0 if top <= 1 else 1000.0
    x1, y1, x2, y2 = (v / scale for v in values)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def parse_boxes(text: str) -> list[Box]:
    """Every box in an answer, in 0-1 coordinates, in the order written (see `_normalise` for the rule)."""
    boxes = []
    for match in _RUN_RE.finditer(text):
        values = match.group().split(",")
        box = _normalise(tuple(float(v) for v in values)) if len(values) == 4 else None
        if box is not None:
            boxes.append(box)
    return boxes


def _square_frame(image_size_wh: tuple[int, int]) -> tuple[int, int, int]:
    """(side, x offset, y offset) of the image inside expand2square's canvas."""
    w, h = image_size_wh
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive (width, height), got {image_size_wh}")
    side = max(w, h)
    return side, (side - w) // 2, (side - h) // 2


def _frame(image_size_wh: tuple[int, int], padded: bool) -> tuple[int, int, int, int]:
    """(width, height, x offset, y offset) of the frame a 0-1 box refers to, in image pixels."""
    if not padded:
        return image_size_wh[0], image_size_wh[1], 0, 0
    side, dx, dy = _square_frame(image_size_wh)
    return side, side, dx, dy


def square_to_image(box01: Box, image_size_wh: tuple[int, int], padded: bool = True) -> Box:
    """A 0-1 box on the padded square -> pixel (x1, y1, x2, y2) on the original image, clipped to it.
    With padded=False the box is taken as relative to the image itself (models without expand2square)."""
    w, h = image_size_wh
    side_x, side_y, dx, dy = _frame(image_size_wh, padded)
    x1, y1, x2, y2 = box01
    return (min(max(x1 * side_x - dx, 0.0), w), min(max(y1 * side_y - dy, 0.0), h),
            min(max(x2 * side_x - dx, 0.0), w), min(max(y2 * side_y - dy, 0.0), h))


def image_to_square(box_px: Box, image_size_wh: tuple[int, int], padded: bool = True) -> Box:
    """Pixel box on the original image -> 0-1 box on the padded square (the inverse of square_to_image)."""
    side_x, side_y, dx, dy = _frame(image_size_wh, padded)
    x1, y1, x2, y2 = box_px
    return (x1 + dx) / side_x, (y1 + dy) / side_y, (x2 + dx) / side_x, (y2 + dy) / side_y


def _text_colour(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = colour[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _draw_label(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], label: str,
                colour: tuple[int, int, int], font: ImageFont.ImageFont) -> None:
    """Label on a filled background: above the box when there is room, else inside its top edge."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = box[0]
    y = box[1] - th if box[1] - th >= 0 else box[1]
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), label, fill=_text_colour(colour), font=font)


def draw_boxes(image: Image.Image, boxes_px: list[Box], labels: list[str] | None = None,
               color: tuple[int, int, int] = (255, 0, 0), width: int | None = None) -> Image.Image:
    """A copy of `image` (as RGB) with each pixel box outlined in `color` and optionally labelled.
    The outline covers columns x1..x2 and rows y1..y2 (rounded) and grows inward by `width` pixels;
    the default width is about 1/200 of the shorter side, at least 2."""
    if labels is not None and len(labels) != len(boxes_px):
        raise ValueError(f"got {len(labels)} labels for {len(boxes_px)} boxes; pass one label per box or None")
    out = image.convert("RGB")  # convert always copies, so the caller's image is never touched
    if width is None:
        width = max(2, round(min(out.size) / 200))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, box in enumerate(boxes_px):
        x1, y1, x2, y2 = (round(v) for v in box)
        x2, y2 = min(x2, out.width - 1), min(y2, out.height - 1)
        draw.rectangle([x1, y1, x2, y2], outline=tuple(color), width=width)
        if labels is not None and labels[i]:
            _draw_label(draw, (x1, y1, x2, y2), labels[i], tuple(color), font)
    return out


def _saw_padded_square(pipe: Any) -> bool:
    """Whether `pipe`'s model sees expand2square's canvas: LlavaConfig.image.mode == "pad"; True for
    objects without a config (LLaVA-1.5 is the model that answers with boxes)."""
    config = getattr(pipe, "config", None)
    image_cfg = getattr(config, "image", None)
    return image_cfg is None or image_cfg.mode == "pad"


def ground(pipe: Any, image: str | Path | bytes | Image.Image, query: str, padded: bool | None = None,
           **generate_kwargs: Any) -> tuple[str, list[Box], Image.Image]:
    """Ask `pipe` (a llavakit Pipeline) `query` about `image`; returns the answer text, the boxes in
    pixels of the original image, and a copy of the image with the boxes drawn and numbered.
    `padded`: whether boxes are on expand2square's canvas; None reads it from the pipe's image mode."""
    img = load_image(image)
    text = pipe.generate(query, images=[img], **generate_kwargs).text
    if padded is None:
        padded = _saw_padded_square(pipe)
    boxes = [square_to_image(b, img.size, padded=padded) for b in parse_boxes(text)]
    labels = [str(i + 1) for i in range(len(boxes))]
    return text, boxes, draw_boxes(img, boxes, labels)
