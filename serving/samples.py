"""Rendered word images for tests and the benchmark where no real crops are at hand."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

WORDS = ("street", "OPEN", "Coffee", "exit", "2024", "station", "Hotel", "sale", "PARKING", "north", "Bank",
         "stop", "London", "pharmacy", "CAFE", "market", "road", "TAXI", "bakery", "Museum")


def word_png(text: str, size: int = 28, seed: int = 0) -> bytes:
    """``text`` drawn in Pillow's default font, dark on light, as PNG bytes."""
    rng = random.Random(seed)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad = size // 4
    ink, paper = rng.randint(0, 80), rng.randint(180, 255)
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (paper,) * 3)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=(ink,) * 3, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def word_images(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` ``(word, PNG bytes)`` pairs, words and sizes varying with ``seed``."""
    rng = random.Random(seed)
    return [(w, word_png(w, rng.choice((20, 24, 28, 32)), rng.randrange(1 << 30)))
            for w in (rng.choice(WORDS) for _ in range(count))]
