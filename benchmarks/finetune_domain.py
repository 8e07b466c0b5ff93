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
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
HEIGHT = 10
BLUR = 1.0
QUALITY = 20


def degrade(image: Image.Image) -> Image.Image:
    """The domain's look: low resolution, blur, heavy JPEG."""
    image = image.convert("RGB")
    width, height = image.size
    small = image.resize((max(1, round(width * HEIGHT / height)), HEIGHT), Image.Resampling.BILINEAR)
    image = small.resize((width, height), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(BLUR))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def build(src: Path, out: Path, seed: int = 0) -> dict[str, int]:
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
            degrade(Image.open(src / "images" / file)).save(folder / "images" / f"{stem}.png")
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
    args = parser.parse_args(argv)
    if not (args.src / "labels.tsv").is_file():
        print(f"error: {args.src}: no labels.tsv (a folder set with images/ and labels.tsv)", file=sys.stderr)
        return 2
    sizes = build(args.src, args.output, args.seed)
    sizes["keep"] = write_keep(args.src, args.output)
    print(sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
