"""Occluded real words: cover inner characters of IIIT5K crops, for measuring the corrector.

Reads a folder set with ``charboxes.tsv`` (``file<TAB>chars<TAB>x,y,w,h;...``, one box per
character, e.g. ``../shared/data/train/iiit5k_train_2000``) and writes a folder set::

    OUT/images/<stem>_o<k>_<positions>.png   the crop with k inner characters covered
    OUT/labels.tsv                           filename<TAB>label (the original label)
    OUT/occlusions.tsv                       filename<TAB>label<TAB>positions<TAB>boxes<TAB>colour
                                             (boxes as drawn, padding included, x,y,w,h;...)

Each word of at least ``2k + 1`` characters (3 for one covered character, 5 for two)
gets one image per ``k`` in ``--counts`` (default 1 and 2): ``k`` inner characters (never the
first or the last) chosen at random (seeded per word) and covered by a rectangle filled
with the median colour of the image border (the background, for a tight word crop). Each
box grows by ``--pad`` pixels (default 1), sideways only up to the visible neighbours'
boxes. Words too short for ``k`` are skipped. The boxes are tight, so slanted glyphs can leave a sliver visible.

    python -m benchmarks.occlusion ../shared/data/train/iiit5k_train_2000 OUT [--counts 1 2] [--limit N]

The data's licence forbids shipping the images: write OUT outside the repository.
"""

from __future__ import annotations

import argparse
import random
import sys
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runtime.occlusion import Box, border_colour, occlude

__all__ = ["Box", "CharBoxes", "border_colour", "build", "choose_positions", "occlude", "padded_boxes",
           "read_charboxes"]


@dataclass(frozen=True)
class CharBoxes:
    """One line of ``charboxes.tsv``: an image, its characters and one box per character."""

    file: str
    chars: str
    boxes: tuple[Box, ...]


def read_charboxes(path: Path) -> list[CharBoxes]:
    """Parse ``charboxes.tsv``; a malformed line raises ``ValueError`` naming it."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            file, chars, raw = line.split("\t")
            boxes = tuple(tuple(int(v) for v in part.split(",")) for part in raw.split(";"))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected file<TAB>chars<TAB>x,y,w,h;...") from None
        if len(boxes) != len(chars) or any(len(b) != 4 for b in boxes):
            raise ValueError(f"{path}:{number}: {len(boxes)} boxes for {len(chars)} characters")
        out.append(CharBoxes(file, chars, boxes))  # type: ignore[arg-type]
    return out


def padded_boxes(word: CharBoxes, positions: list[int], pad: int) -> list[Box]:
    """The boxes of ``positions`` grown by ``pad`` pixels (glyphs often overhang their box).

    Vertically they grow freely; sideways never into the box of a character that stays
    visible, so no other character is covered.
    """
    chosen = set(positions)
    out = []
    for i in positions:
        x, y, w, h = word.boxes[i]
        x0, x1 = x - pad, x + w + pad
        if i - 1 >= 0 and i - 1 not in chosen:
            px, _, pw, _ = word.boxes[i - 1]
            x0 = max(x0, min(x, px + pw))
        if i + 1 < len(word.boxes) and i + 1 not in chosen:
            x1 = min(x1, max(x + w, word.boxes[i + 1][0]))
        out.append((x0, y - pad, x1 - x0, h + 2 * pad))
    return out


def min_length(count: int) -> int:
    """The shortest word that gets ``count`` covered characters: ``2 * count + 1``."""
    return 2 * count + 1


def choose_positions(word: CharBoxes, count: int, seed: int = 0) -> list[int] | None:
    """``count`` distinct inner positions of ``word`` (sorted), or None when it is too short."""
    inner = list(range(1, len(word.chars) - 1))
    if count < 1 or len(word.chars) < min_length(count):
        return None
    rng = random.Random(zlib.crc32(f"{seed}:{word.file}:{count}".encode()))
    return sorted(rng.sample(inner, count))


def build(source: Path, out: Path, counts: tuple[int, ...] = (1, 2), limit: int | None = None,
          seed: int = 0, pad: int = 1, files: Collection[str] | None = None) -> int:
    """Write the occluded set from ``source`` to ``out``; returns the number of images.

    ``files``: only the words of these image files (e.g. a validation part).
    """
    words = read_charboxes(source / "charboxes.tsv")[:limit]
    if files is not None:
        keep = set(files)
        words = [w for w in words if w.file in keep]
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels, details = [], []
    for word in words:
        with Image.open(source / "images" / word.file) as opened:
            image = opened.convert("RGB")
        colour = border_colour(image)
        for count in counts:
            positions = choose_positions(word, count, seed)
            if positions is None:
                continue
            boxes = padded_boxes(word, positions, pad)
            name = f"{Path(word.file).stem}_o{count}_{'-'.join(map(str, positions))}.png"
            occlude(image, boxes, colour).save(out / "images" / name)
            labels.append(f"{name}\t{word.chars}")
            details.append("\t".join([
                name, word.chars, ",".join(map(str, positions)),
                ";".join(",".join(map(str, b)) for b in boxes), ",".join(map(str, colour)),
            ]))
    (out / "labels.tsv").write_text("".join(line + "\n" for line in labels), encoding="utf-8")
    (out / "occlusions.tsv").write_text("".join(line + "\n" for line in details), encoding="utf-8")
    return len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.occlusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with images/ and charboxes.tsv")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="characters covered per image")
    parser.add_argument("--limit", type=int, default=None, help="only the first N words")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad", type=int, default=1, help="pixels added around each box (not into neighbours)")
    args = parser.parse_args(argv)
    if not (args.source / "charboxes.tsv").is_file():
        parser.error(f"{args.source} has no charboxes.tsv")
    n = build(args.source, args.out, tuple(args.counts), args.limit, args.seed, args.pad)
    print(f"wrote {n} occluded images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
