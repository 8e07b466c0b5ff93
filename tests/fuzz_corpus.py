"""A bad-input corpus made deterministically (a seed, no files shipped): a few hundred image
files of many kinds, each known to be readable or not.

Bad: random bytes, truncated PNG/JPEG/WebP/TIFF/GIF, zero and huge sizes in headers, a real
decompression bomb, empty files, text behind an image name. Odd but good (each must be read):
CMYK, 16-bit, palette (with transparency), alpha, grey, animated GIF and WebP, EXIF-rotated
JPEG, 1xN and Nx1 images, and plain word images between them (whose words are checked).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import barcode
from PIL import Image

#: words drawn as the plain good images (the fake backend reads them exactly)
WORDS = ("alpha", "b2", "gamma", "d4lt4", "echo", "fox", "golf", "hotel")


@dataclass(frozen=True)
class Entry:
    """One file of the corpus."""

    path: Path
    kind: str
    #: whether it must be read (else: exactly one error record)
    readable: bool
    #: the word it shows, where the fake backend must read it exactly
    word: str | None = None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, data: bytes = b"\0" * 64) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (grey, 8-bit) over ``data`` (deflated)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def real_png_bomb(side: int = 20_000) -> bytes:
    """A valid grey PNG of ``side`` x ``side`` zero pixels: ~400 MB decoded from ~400 KB."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    deflate = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    parts = [deflate.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(deflate.flush())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def gif_huge_screen() -> bytes:
    """A GIF whose logical screen is 65535 x 65535 pixels."""
    small = _save(barcode("gif").convert("P"), format="GIF")
    return small[:6] + struct.pack("<HH", 65535, 65535) + small[10:]


def jpeg_huge_frame() -> bytes:
    """A JPEG whose frame header (SOF0) declares 65500 x 65500 pixels."""
    data = bytearray(_save(barcode("jpeg"), format="JPEG"))
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def _save(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _exif_rotated(word: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return _save(barcode(word), format="JPEG", quality=95, exif=exif.tobytes())


def _animated(word: str, fmt: str) -> bytes:
    frames = [barcode(word), barcode(word[::-1])]
    if fmt == "GIF":
        frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    return _save(frames[0], format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _transparent_palette(word: str) -> bytes:
    image = barcode(word).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, format="PNG", transparency=0)


def _png16(word: str) -> bytes:
    return _save(Image.fromarray(np.asarray(barcode(word).convert("L"), dtype=np.uint16) * 257), format="PNG")


#: good files: kind -> (file suffix, maker(word)); each must read (odd ones need not read the word)
ODD: dict[str, tuple[str, Callable[[str], bytes]]] = {
    "cmyk_jpeg": (".jpg", lambda w: _save(barcode(w).convert("CMYK"), format="JPEG", quality=95)),
    "cmyk_tiff": (".tif", lambda w: _save(barcode(w).convert("CMYK"), format="TIFF")),
    "png16": (".png", _png16),
    "palette_png": (".png", lambda w: _save(barcode(w).convert("P", palette=Image.Palette.ADAPTIVE), format="PNG")),
    "palette_transparent": (".png", _transparent_palette),
    "rgba_png": (".png", lambda w: _save(barcode(w).convert("RGBA"), format="PNG")),
    "grey_la_png": (".png", lambda w: _save(barcode(w).convert("LA"), format="PNG")),
    "animated_gif": (".gif", lambda w: _animated(w, "GIF")),
    "animated_webp": (".webp", lambda w: _animated(w, "WEBP")),
    "exif_rotated_jpeg": (".jpg", _exif_rotated),
    "one_by_n": (".png", lambda w: _save(Image.new("RGB", (1, 300), "white"), format="PNG")),
    "n_by_one": (".png", lambda w: _save(Image.new("RGB", (3000, 1), "black"), format="PNG")),
    "one_by_one": (".png", lambda w: _save(Image.new("RGB", (1, 1), "white"), format="PNG")),
}

#: formats whose files are cut short, with PIL's save options
TRUNCATED = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 90},
             "webp": {"format": "WEBP", "quality": 90}, "tiff": {"format": "TIFF", "compression": "tiff_lzw"},
             "gif": {"format": "GIF"}}
#: where they are cut, as fractions of the file: every cut leaves too little to decode
CUTS = (0.02, 0.1, 0.3, 0.5, 0.7, 0.85)


def make_corpus(root: Path, seed: int = 0, random_files: int = 100, plain: int = 100) -> list[Entry]:
    """Write the corpus into ``root`` (created) and list it, in a shuffled but fixed order."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, str, bytes, bool, str | None]] = []  # (kind, suffix, data, readable, word)
    for _ in range(random_files):
        size = rng.choice((1, 7, 64, 500, 4096))
        prefix = rng.choice((b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF", b"II*\0"))
        items.append(("random_bytes", rng.choice((".png", ".jpg", ".gif", ".webp", ".tif")),
                      prefix + rng.randbytes(size), False, None))
    for fmt, options in TRUNCATED.items():
        word = "truncated" if fmt != "gif" else "cut"
        image = barcode(word)
        if fmt == "gif":
            image = image.resize((image.width * 3, image.height * 3)).convert("P", palette=Image.Palette.ADAPTIVE)
        data = _save(image, **options)
        for cut in CUTS:
            suffix = ".jpg" if fmt == "jpeg" else f".{fmt}"
            items.append((f"truncated_{fmt}", suffix, data[:max(1, int(len(data) * cut))], False, None))
    for width, height in ((0, 40), (40, 0), (0, 0)):
        items.append(("zero_size_png", ".png", png_header_only(width, height), False, None))
    for width, height in ((100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (70_000, 70_000)):
        items.append(("huge_header_png", ".png", png_header_only(width, height), False, None))
    items.append(("huge_header_gif", ".gif", gif_huge_screen(), False, None))
    items.append(("huge_header_jpeg", ".jpg", jpeg_huge_frame(), False, None))
    items.append(("decompression_bomb", ".png", real_png_bomb(), False, None))
    for _ in range(3):
        items.append(("empty", ".png", b"", False, None))
    items.append(("text_named_png", ".png", b"word,label\nhello,world\n", False, None))
    for kind, (suffix, make) in ODD.items():
        for _ in range(3):
            items.append((kind, suffix, make(_word(rng)), True, None))
    for _ in range(plain):
        word = _word(rng)
        items.append(("plain_png", ".png", _save(barcode(word), format="PNG"), True, word))
    rng.shuffle(items)
    entries = []
    for i, (kind, suffix, data, readable, word) in enumerate(items):
        path = root / f"{i:04d}_{kind}{suffix}"
        path.write_bytes(data)
        entries.append(Entry(path, kind, readable, word))
    return entries
