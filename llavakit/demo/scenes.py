"""Synthetic scenes for the built-in demo model: plain shapes in plain colours, and conversations
about them (captions, colours, shapes, counts, yes/no, boxes, left/right/above, follow-ups).

Every question kind has several phrasings, so a model learns the question rather than a template.
Boxes are "[x1, y1, x2, y2]" in 0-1 coordinates of the padded square (LLaVA-1.5's expand2square frame).
Everything is deterministic in the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
          "blue": (40, 80, 220), "purple": (140, 50, 180), "black": (20, 20, 20), "white": (250, 250, 250),
          "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "rectangle", "triangle", "star")
BACKGROUNDS = [(235, 225, 200), (200, 232, 236), (246, 216, 226), (214, 240, 208), (52, 62, 78), (205, 185, 150),
               (170, 200, 225), (255, 255, 255), (244, 244, 238), (226, 226, 226),
               (60, 60, 60)]  # pastel, neutral, dark
CANVASES = [(160, 120), (120, 160), (160, 160), (192, 108), (108, 192), (144, 112), (112, 144), (150, 100), (100, 150)]
NUMBER_WORDS = ["Zero", "One", "Two", "Three", "Four", "Five"]


@dataclass(frozen=True, slots=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # pixels (x1, y1, x2, y2), x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True, slots=True)
class Scene:
    width: int
    height: int
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient top -> bottom (equal: plain)
    shapes: tuple[Shape, ...]

    def render(self) -> Image.Image:
        img = _background(self.width, self.height, *self.background)
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            draw_shape(draw, s.kind, s.box, COLORS[s.color])
        return img

    def norm_box(self, shape: Shape) -> list[float]:
        """The box in 0-1 coordinates of the padded square the model sees."""
        side = max(self.width, self.height)
        ox, oy = (side - self.width) // 2, (side - self.height) // 2
        x1, y1, x2, y2 = shape.box
        return [round((x1 + ox) / side, 2), round((y1 + oy) / side, 2), round((x2 + ox) / side, 2),
                round((y2 + oy) / side, 2)]


def _background(w: int, h: int, top, bottom) -> Image.Image:
    if top == bottom:
        return Image.new("RGB", (w, h), top)
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    return img


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw one shape filling its box (Pillow's inclusive corners: x2 - 1, y2 - 1)."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    if kind == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif kind in ("square", "rectangle"):
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + r * 0.05))
        draw.polygon(points, fill=fill)


def _luminance(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrast_ok(color: tuple[int, int, int], background) -> bool:
    return all(abs(_luminance(color) - _luminance(b)) > 45
               or sum(abs(x - y) for x, y in zip(color, b, strict=True)) > 150 for b in background)


def random_scene(rng: random.Random, max_shapes: int = 4, any_canvas: bool = False) -> Scene:
    """A canvas of random aspect with 1..max_shapes non-overlapping shapes of distinct (colour, kind).

    The canvas is one of CANVASES, or with `any_canvas` any size with a long side of 96 to 320 pixels and
    an aspect up to 1.8:1 (the short side at least 64), so that the padding bands the model sees come in
    every width, not in nine, and shapes span 20-60% of the canvas's short side rather than 24-44%."""
    if any_canvas:
        long = rng.randint(96, 320)
        short = rng.randint(max(64, round(long / 1.8)), long)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        w, h = rng.choice(CANVASES)
    top = rng.choice(BACKGROUNDS)
    background = (top, top) if rng.random() < 0.6 else (top, rng.choice(BACKGROUNDS))
    colors = [c for c, rgb in COLORS.items() if _contrast_ok(rgb, background)]
    shapes: list[Shape] = []
    for _ in range(rng.randint(1, max_shapes)):
        for _attempt in range(40):
            shape = _random_shape(rng, w, h, colors, (0.2, 0.6) if any_canvas else (0.24, 0.44))
            if all(_apart(shape.box, s.box) for s in shapes) and all(shape.name != s.name for s in shapes):
                shapes.append(shape)
                break
    return Scene(w, h, background, tuple(shapes))


def _random_shape(rng: random.Random, w: int, h: int, colors: list[str], span: tuple[float, float]) -> Shape:
    kind = rng.choice(SHAPES)
    size = rng.randint(int(span[0] * min(w, h)), int(span[1] * min(w, h)))
    bw, bh = size, size
    if kind == "rectangle":
        long, short = size, max(8, int(size / rng.uniform(1.9, 2.5)))
        bw, bh = (long, short) if rng.random() < 0.5 else (short, long)
    x, y = rng.randint(2, w - bw - 2), rng.randint(2, h - bh - 2)
    return Shape(kind, rng.choice(colors), (x, y, x + bw, y + bh))


def _apart(a, b, margin: int = 4) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]
