"""A domain the default model never trained on, for ``training.finetune``: real word crops
made small, blurred and JPEG-compressed, as a cheap low-resolution camera gives them.

    python -m benchmarks.finetune_domain SRC -o OUT [--seed 0]

SRC is a labelled folder set (``images/`` + ``labels.tsv``; e.g. IIIT5K train). OUT gets three
folder sets, ``train``, ``val`` and ``test`` (70 / 10 / 20 % of the crops, by a seeded
permutation), each crop degraded the same deterministic way: shrunk to 10 pixels high and
back (bilinear), blurred (Gaussian, radius 1.0) and saved as JPEG at quality 20. Write OUT
outside the repository (the crops' licence).

OUT also gets ``keep.tsv``: general scene-text crops whose reading a fine-tune must keep, the
default model's own validation crops (the 5% its training held out,
``benchmarks.correction.carve_val_real``) minus those of SRC's set, so that no crop is both a
degraded training crop and a clean keep crop (``training.finetune ... --keep OUT/keep.tsv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
HEIGHT = 10
BLUR = 1.0
QUALITY = 20


def degrade(image: Image.Image) -> Image.Image:
    """The domain's look: low resolution, blur, heavy JPEG."""
    from training.data.transforms import camera_look

    return camera_look(image, HEIGHT, BLUR, QUALITY)


#: rows of lamps of the ``led`` look (a crop's height in lamps) and pixels per lamp
LED_ROWS = 14
LED_PITCH = 4


def led(image: Image.Image) -> Image.Image:
    """An LED sign's look: the word as amber lamps on a grid, on black (dark text on a light
    ground is inverted first, so the text is what lights)."""
    from PIL import ImageDraw, ImageOps

    gray = ImageOps.grayscale(image)
    width, height = gray.size
    cols = max(1, round(width * LED_ROWS / height))
    small = np.asarray(gray.resize((cols, LED_ROWS), Image.Resampling.BILINEAR), dtype=np.float32)
    lit = small > small.mean()
    if lit.mean() > 0.5:  # most lamps lit: the text is the dark part
        lit = ~lit
    out = Image.new("RGB", (cols * LED_PITCH, LED_ROWS * LED_PITCH), (10, 8, 6))
    draw = ImageDraw.Draw(out)
    radius = LED_PITCH / 2 - 0.6
    for y, x in zip(*np.nonzero(lit)):
        cx, cy = (x + 0.5) * LED_PITCH, (y + 0.5) * LED_PITCH
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(255, 176, 40))
    return out


#: the ``night`` look: brightness kept (after a gamma of 1.6, which crushes the shadows), the
#: sensor noise's standard deviation (of 1.0, full scale) and the shake (a horizontal motion
#: blur) as a fraction of the crop's height
NIGHT_GAIN = 0.3
NIGHT_NOISE = 0.04
NIGHT_SHAKE = 0.25


def night(image: Image.Image) -> Image.Image:
    """A night camera's look: dark, noisy and shaken (the noise is seeded by the crop's pixels,
    so a crop always gets the same)."""
    import hashlib

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    dark = pixels ** 1.6 * NIGHT_GAIN
    length = max(3, round(NIGHT_SHAKE * pixels.shape[0]))
    padded = np.pad(dark, ((0, 0), (length // 2, length - 1 - length // 2), (0, 0)), mode="edge")
    sums = np.cumsum(np.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
    shaken = (sums[:, length:] - sums[:, :-length]) / length
    seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()[:8], "little")
    noisy = shaken + np.random.default_rng(seed).normal(0.0, NIGHT_NOISE, shaken.shape)
    return Image.fromarray((np.clip(noisy, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


#: the looks ``--look`` offers
LOOKS = {"lowres": degrade, "led": led, "night": night}


def build(src: Path, out: Path, seed: int = 0, look: str = "lowres") -> dict[str, int]:
    """Write the three degraded splits; their sizes."""
    rows = [line.split("\t", 1) for line in (src / "labels.tsv").read_text(encoding="utf-8").splitlines()
            if "\t" in line]
    order = np.random.default_rng(seed).permutation(len(rows))
    sizes, start = {}, 0
    for k, (name, share) in enumerate(SPLITS):
        count = len(rows) - start if k == len(SPLITS) - 1 else int(round(len(rows) * share))
        folder = out / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in order[start:start + count]:
            file, label = rows[i]
            stem = Path(file).stem
            LOOKS[look](Image.open(src / "images" / file).convert("RGB")).save(folder / "images" / f"{stem}.png")
            lines.append(f"{stem}.png\t{label}\n")
        (folder / "labels.tsv").write_text("".join(lines), encoding="utf-8")
        sizes[name] = count
        start += count
    return sizes


def write_keep(src: Path, out: Path) -> int:
    """Write ``out/keep.tsv`` (absolute image paths); how many crops it lists."""
    from benchmarks.correction import TRAIN, carve_val_real

    rows = [(name, file, label) for name, file, label in carve_val_real(out) if name != src.resolve().name]
    lines = [f"{TRAIN / name / 'images' / file}\t{label}\n" for name, file, label in rows]
    (out / "keep.tsv").write_text("".join(lines), encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_domain", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--look", choices=sorted(LOOKS), default="lowres",
                        help="lowres: small, blurred, JPEG-compressed (default); led: an LED sign's lamps")
    args = parser.parse_args(argv)
    if not (args.src / "labels.tsv").is_file():
        print(f"error: {args.src}: no labels.tsv (a folder set with images/ and labels.tsv)", file=sys.stderr)
        return 2
    sizes = build(args.src, args.output, args.seed, args.look)
    sizes["keep"] = write_keep(args.src, args.output)
    print(sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
