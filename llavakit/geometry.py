"""Image-token geometry shared by processing (token counts known before the vision tower runs) and
models (the AnyRes merge): pure integer arithmetic on sizes, no torch. Sizes are (height, width)."""

from __future__ import annotations

import math


def select_best_resolution(image_hw: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of the image's pixels, ties broken by least waste."""
    h, w = image_hw
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    assert best is not None, "pinpoints must not be empty"
    return best


def fit_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) scaled to fit `target_hw` keeping aspect: the limiting side exact, the other rounded up.

    The scale is taken first and then multiplied, as LLaVA-NeXT and transformers do; the float error
    matters: 2000x1500 into 672x672 gives ceil(1500 * 0.336) = ceil(504.00000000000006) = 505, not 504.
    """
    h, w = image_hw
    th, tw = target_hw
    scale_h, scale_w = th / h, tw / w
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def anyres_grid(image_hw: tuple[int, int], pinpoints: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles AnyRes cuts the image into."""
    bh, bw = select_best_resolution(image_hw, pinpoints)
    return bh // tile, bw // tile


def unpad_shape(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows/columns of a (gh, gw) feature grid that show the image rather than the black padding.

    Returns (top, bottom, left, right) bounds. Rounds like transformers (round(x, 7)) so that counts
    agree with its processor; the original LLaVA truncates, which differs only on exact halves.
    """
    h, w = image_hw
    gh, gw = grid_hw
    if w / h > gw / gh:
        new_h = int(round(h * (gw / w), 7))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = int(round(w * (gh / h), 7))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad
