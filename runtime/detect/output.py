"""Printing and drawing the words of photos (``clipllama-run --detect``, ``--draw``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from PIL import ImageDraw, ImageFont

from runtime.detect.photo import PhotoResult, load_photo
from runtime.detect.settings import DetectUnavailable


def plain_lines(result: PhotoResult) -> list[str]:
    """``SOURCE<TAB>x1,y1,x2,y2,x3,y3,x4,y4<TAB>TEXT`` per word (whole pixels)."""
    return [f"{result.source}\t{','.join(str(int(round(v))) for point in w.polygon for v in point)}\t{w.text}"
            for w in result.words]


def photo_record(result: PhotoResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of a photo (``--json``, ``POST /read?detect=1``, ``clipllama-batch
    --detect``): ``source``, ``words``, size, timings, ``error`` when it failed, and ``extra``."""
    data = result.to_dict()
    if result.error is None:
        del data["error"]
    return {**data, **(extra or {})}


def print_photo(result: PhotoResult, out: TextIO, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """One photo's words on ``out`` (its error on stderr)."""
    if as_json:
        print(json.dumps(photo_record(result, extra), ensure_ascii=False), file=out, flush=True)
    else:
        for line in plain_lines(result):
            print(line, file=out, flush=True)
    if result.error is not None:
        print(f"error: {result.error}" if result.source in result.error else f"error: {result.source}: {result.error}",
              file=sys.stderr, flush=True)


def draw(result: PhotoResult, photo: Any, folder: Path, taken: set[str]) -> Path | None:
    """The photo with its word boxes and texts drawn on it, as ``folder/<name>.png``
    (names made unique within ``taken``); None for a photo that could not be read."""
    if result.error is not None:
        return None
    image = load_photo(photo).copy()
    canvas = ImageDraw.Draw(image)
    size = max(12, min(image.size) // 40)
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    for word in result.words:
        points = [tuple(p) for p in word.polygon]
        canvas.polygon(points, outline=(255, 32, 32), width=max(2, size // 6))
        x, y = points[0]
        box = canvas.textbbox((x, y - size - 2), word.text, font=font)
        canvas.rectangle(box, fill=(255, 255, 255))
        canvas.text((x, y - size - 2), word.text, fill=(200, 0, 0), font=font)
    stem = Path(str(result.source)).stem or "photo"
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.png"
    image.save(target)
    return target


def read_and_print(recognizer: Any, items: Iterable[Any], out: TextIO, as_json: bool, batch: int,
                   draw_dir: str | None = None, extra: dict[str, Any] | None = None) -> int:
    """Read every photo, print its words (and draw them); the number of photos that failed."""
    failed = 0
    taken: set[str] = set()
    for item in items:
        result = recognizer.read_photos([item], batch_size=batch)[0]
        failed += not result.ok
        print_photo(result, out, as_json, extra)
        if draw_dir is not None and result.ok:
            try:
                draw(result, item.data if hasattr(item, "data") else item, Path(draw_dir), taken)
            except OSError as exc:
                print(f"error: --draw {draw_dir}: {exc}", file=sys.stderr, flush=True)
                failed += 1
    return failed


__all__ = ["DetectUnavailable", "draw", "photo_record", "plain_lines", "print_photo", "read_and_print"]
