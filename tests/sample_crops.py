"""The embedded bundle's sample words as test crops: each sharp, and blurred so that the CTC
head doubts some of them (tests of the readings that only doubtful crops get)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFilter

from runtime import cli

SAMPLES = Path(cli.DEFAULT_BUNDLE).parent / "samples"


def sharp_and_blurred() -> list[Image.Image]:
    """Every sample word, sharp then blurred (Gaussian, radius 2.5)."""
    out = []
    for path in sorted(SAMPLES.glob("*.png")):
        sharp = Image.open(path).convert("RGB")
        out += [sharp, sharp.filter(ImageFilter.GaussianBlur(2.5))]
    return out
