"""Grounding: box parsing, the padded-square <-> image mapping, drawing read back pixel by pixel, ground()."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import noise_image
from PIL import Image

from llavakit.eval.grounding import draw_boxes, ground, image_to_square, parse_boxes, square_to_image
from llavakit.processing.image import expand2square

SEED000 = "0.23, 0.33, 0.79, 0.78"


@pytest.mark.parametrize("text, expected", [
    ("[0.1, 0.2, 0.3, 0.4]", [(0.1, 0.2, 0.3, 0.4)]),
    ("[0.1,0.2,0.3,0.4]", [(0.1, 0.2, 0.3, 0.4)]),
    (SEED000, [(0.23, 0.33, 0.79, 0.78)]),
    (f"The bus is at {SEED000}.", [(0.23, 0.33, 0.79, 0.78)]),
    ("[.1, .2, .3, .4]", [(0.1, 0.2, 0.3, 0.4)]),
    ("<box>(100,200,300,400)</box>", [(0.1, 0.2, 0.3, 0.4)]),
    ("[0, 0, 1000, 500]", [(0.0, 0.0, 1.0, 0.5)]),
    ("0, 0, 1, 1", [(0.0, 0.0, 1.0, 1.0)]),
    ("a [0.1, 0.2, 0.3, 0.4] and b [0.5, 0.5, 0.9, 1.0]", [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 1.0)]),
    ("[0.1, 0.2, 0.3, 0.4],[100, 200, 300, 400]", [(0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)]),
])
def test_parse_boxes(text, expected):
    got = parse_boxes(text)
    assert len(got) == len(expected)
    for box, want in zip(got, expected, strict=True):
        assert box == pytest.approx(want)


@pytest.mark.parametrize("text", [
    "", "There is no bus in this picture.", "1, 2, 3", "1, 2, 3, 4, 5",  # not four numbers
    "[0.5, 0.5, 0.2, 0.9]", "[0.1, 0.6, 0.3, 0.4]", "[0.2, 0.2, 0.2, 0.4]",  # x2 <= x1 or y2 <= y1
    "[10, 20, 1200, 40]", "[-0.1, 0.2, 0.3, 0.4]",  # beyond 0-1000, negative
])
def test_parse_boxes_rejects(text):
    assert parse_boxes(text) == []


def test_scale_is_decided_per_box():
    assert parse_boxes("[0.5, 0.5, 1, 1] [500, 500, 1000, 1000]") == [(0.5, 0.5, 1.0, 1.0)] * 2


SIZES = [(640, 360), (360, 640), (500, 500), (641, 360), (360, 641)]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_within_a_pixel(size):
    w, h = size
    rng = np.random.RandomState(0)
    for _ in range(50):
        xs, ys = np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))
        box = (xs[0], ys[0], xs[1], ys[1])
        back = square_to_image(image_to_square(box, size), size)
        assert np.abs(np.subtract(back, box)).max() < 1.0


@pytest.mark.parametrize("size", SIZES)
def test_image_frame_matches_expand2square(size):
    """The image's own corners map to exactly where expand2square pasted it."""
    w, h = size
    canvas = np.asarray(expand2square(Image.new("RGB", size, (255, 255, 255)), (0, 0, 0)))
    side = canvas.shape[0]
    x1, y1, x2, y2 = (round(v * side) for v in image_to_square((0, 0, w, h), size))
    assert (canvas[y1:y2, x1:x2] == 255).all() and (x2 - x1, y2 - y1) == (w, h)
    assert canvas.sum() == 255 * 3 * w * h  # nothing outside that rectangle is image
    assert square_to_image((0.0, 0.0, 1.0, 1.0), size) == (0, 0, w, h)  # padding clipped away


def test_seed000_on_wide_and_tall_images():
    box = parse_boxes(SEED000)[0]
    # 640x360: side 640, image at y offset (640 - 360) // 2 = 140; x = v * 640, y = v * 640 - 140.
    assert square_to_image(box, (640, 360)) == pytest.approx((147.2, 71.2, 505.6, 359.2))
    # 360x640: image at x offset 140; x2 = 0.79 * 640 - 140 = 365.6 is clipped to the width 360.
    assert square_to_image(box, (360, 640)) == pytest.approx((7.2, 211.2, 360.0, 499.2))


def test_unpadded_boxes_are_relative_to_the_image():
    assert square_to_image((0.25, 0.5, 0.75, 1.0), (640, 360), padded=False) == (160, 180, 480, 360)
    assert image_to_square((160, 180, 480, 360), (640, 360), padded=False) == (0.25, 0.5, 0.75, 1.0)


def test_bad_size_raises():
    with pytest.raises(ValueError, match="positive"):
        square_to_image((0, 0, 1, 1), (0, 10))


def test_draw_boxes_pixels():
    img = noise_image(200, 120)
    before = np.asarray(img).copy()
    out = draw_boxes(img, [(40, 50, 160, 110)], width=3)
    arr = np.asarray(out)
    red = np.array([255, 0, 0])
    for y in (50, 80, 110):  # left and right edges, three pixels thick, inward
        for x in (40, 42, 158, 160):
            assert (arr[y, x] == red).all(), (x, y)
    for x in (40, 100, 160):  # top and bottom edges
        assert (arr[50, x] == red).all() and (arr[110, x] == red).all()
    assert (arr[60:108, 43:158] == before[60:108, 43:158]).all()  # interior untouched
    assert (arr[:, :39] == before[:, :39]).all() and (arr[:, 162:] == before[:, 162:]).all()
    assert (np.asarray(img) == before).all()  # the input image is not modified
    assert out is not img


def test_draw_boxes_labels():
    img = Image.new("RGB", (200, 120), (255, 255, 255))
    plain = np.asarray(draw_boxes(img, [(40, 50, 160, 110)], color=(0, 0, 255)))
    labelled = np.asarray(draw_boxes(img, [(40, 50, 160, 110)], labels=["bus"], color=(0, 0, 255)))
    changed = np.argwhere((plain != labelled).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].max() < 50 and changed[:, 1].min() >= 40  # label sits above the box, from its left edge
    near_top = np.asarray(draw_boxes(img, [(40, 2, 160, 110)], labels=["bus"], color=(0, 0, 255)))
    assert (near_top[5:10, 45:50] != 255).any()  # no room above: drawn inside the top edge
    with pytest.raises(ValueError, match="labels"):
        draw_boxes(img, [(0, 0, 10, 10)], labels=["a", "b"])


def test_draw_boxes_clips_and_default_width():
    img = noise_image(100, 80)
    arr = np.asarray(draw_boxes(img, [(0, 0, 100, 80)]))  # edge on the last row/column is still visible
    assert (arr[79, 50] == [255, 0, 0]).all() and (arr[40, 99] == [255, 0, 0]).all()
    assert (arr[40, 1] == [255, 0, 0]).all() and (arr[40, 2] != [255, 0, 0]).any()  # width 2


class FakePipe:
    def __init__(self, answer, mode=None):
        self.answer, self.calls = answer, []
        if mode is not None:
            self.config = SimpleNamespace(image=SimpleNamespace(mode=mode))

    def generate(self, prompt, images=None, **kwargs):
        self.calls.append((prompt, images, kwargs))
        return SimpleNamespace(text=self.answer)


def test_ground_with_fake_pipe():
    pipe = FakePipe(f"The bus: [{SEED000}]")
    img = noise_image(640, 360)
    text, boxes, drawn = ground(pipe, img, "Where is the bus?", max_new_tokens=32)
    assert text == f"The bus: [{SEED000}]"
    assert boxes == [pytest.approx((147.2, 71.2, 505.6, 359.2))]
    prompt, images, kwargs = pipe.calls[0]
    assert prompt == "Where is the bus?" and kwargs == {"max_new_tokens": 32}
    assert len(images) == 1 and images[0].size == (640, 360)
    arr = np.asarray(drawn)
    assert drawn.size == (640, 360) and (arr[200, 147] == [255, 0, 0]).all()
    assert (np.asarray(img) != arr).any(axis=2).sum() > 0


def test_ground_loads_bytes_and_handles_no_box():
    buf = io.BytesIO()
    noise_image(100, 60).save(buf, format="PNG")
    _, boxes, drawn = ground(FakePipe("I cannot see a bus."), buf.getvalue(), "Where is the bus?")
    assert boxes == [] and drawn.size == (100, 60)
    assert (np.asarray(drawn) == np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).all()


@pytest.mark.parametrize("mode, padded, expected", [
    ("pad", None, (147.2, 71.2, 505.6, 359.2)),
    ("anyres", None, (147.2, 118.8, 505.6, 280.8)),  # boxes relative to the image itself
    ("anyres", True, (147.2, 71.2, 505.6, 359.2)),  # an explicit argument wins
])
def test_ground_follows_the_image_mode(mode, padded, expected):
    _, boxes, _ = ground(FakePipe(SEED000, mode), noise_image(640, 360), "Where?", padded=padded)
    assert boxes == [pytest.approx(expected)]
