"""Covering characters of a word image: the drawing both the occluded benchmark sets
(:mod:`benchmarks.occlusion`) and the synthetic training words (:mod:`training.data.render`)
use. numpy and Pillow only."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

#: A box: x, y, width, height (pixels).
Box = tuple[int, int, int, int]


def border_colour(image: Image.Image, width: int = 2) -> tuple[int, ...]:
    """Median colour of the outer ``width`` pixels of ``image`` (RGB)."""
    a = np.asarray(image.convert("RGB"))
    w = max(1, min(width, a.shape[0] // 2, a.shape[1] // 2))
    ring = np.concatenate([a[:w].reshape(-1, 3), a[-w:].reshape(-1, 3), a[:, :w].reshape(-1, 3),
                           a[:, -w:].reshape(-1, 3)])
    return tuple(int(v) for v in np.median(ring, axis=0))


def clip_box(box: Box, size: tuple[int, int]) -> Box:
    """``box`` (x, y, w, h) clipped to an image of ``size`` (width, height)."""
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(size[0], x + w), min(size[1], y + h)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def occlude(image: Image.Image, boxes: list[Box], colour: tuple[int, ...]) -> Image.Image:
    """A copy of ``image`` (RGB) with each box (x, y, w, h) filled with ``colour``."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    for x, y, w, h in (clip_box(b, out.size) for b in boxes):
        if w and h:
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    return out
