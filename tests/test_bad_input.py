"""Bad input loses nothing else: each broken or odd file gives one record, the rest is read."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import barcode
from PIL import Image

WORDS = ["alpha", "b2", "gamma", "d4lt4", "echo"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _save(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _png16(word: str) -> bytes:
    grey = np.asarray(barcode(word).convert("L"), dtype=np.uint16) * 257
    return _save(Image.fromarray(grey), format="PNG")


def _palette(image: Image.Image) -> Image.Image:
    return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)


def _gif(words: list[str]) -> bytes:
    frames = [_palette(barcode(w)) for w in words]
    return _save(frames[0], format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


#: name -> (file content, whether it must read; if it reads, the word expected or None)
BAD: dict[str, tuple[Callable[[], bytes], bool, str | None]] = {
    "corrupt": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x13garbage" * 50, False, None),
    "truncated": (lambda: _save(barcode("truncated"), format="PNG")[:60], False, None),
    "empty": (lambda: b"", False, None),
    "bomb": (png_bomb, False, None),
    "not_an_image": (lambda: b"word,label\nhello,world\n", False, None),
    "png16": (lambda: _png16("sixteen"), True, None),  # contrast is stretched: levels change
    "cmyk_jpeg": (lambda: _save(barcode("cmyk").convert("CMYK"), format="JPEG", quality=95), True, None),
    "palette_png": (lambda: _save(_palette(barcode("palette")), format="PNG"), True, "palette"),
    "animated_gif": (lambda: _gif(["first", "second"]), True, "first"),
}


@pytest.fixture
def good_files(tmp_path: Path) -> list[Path]:
    paths = []
    for word in WORDS:
        path = tmp_path / f"{word}.png"
        barcode(word).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_in_the_middle_of_a_batch(kind: str, fake_recognizer, good_files: list[Path],
                                           tmp_path: Path) -> None:
    make, readable, expected = BAD[kind]
    bad = tmp_path / f"bad_{kind}.png"
    bad.write_bytes(make())
    recognizer = fake_recognizer()
    batch = good_files[:2] + [bad] + good_files[2:]
    results = recognizer.read(batch, batch_size=len(batch))
    assert len(results) == len(batch)
    assert [r.source for r in results] == [str(p) for p in batch]
    middle = results[2]
    if readable:
        assert middle.ok, middle.error
        assert isinstance(middle.text, str)
        if expected is not None:
            assert middle.text == expected
    else:
        assert not middle.ok and middle.error and str(bad) in middle.error
        assert middle.text is None and middle.timings_ms == {}
    others = results[:2] + results[3:]
    assert [r.error for r in others] == [None] * len(WORDS)
    assert [r.text for r in others] == WORDS
    alone = [recognizer.read([p])[0] for p in good_files]
    for together, single in zip(others, alone):
        assert together.text == single.text
        np.testing.assert_allclose(together.char_confidences, single.char_confidences, rtol=1e-6)


def test_each_failure_says_why(fake_recognizer, tmp_path: Path) -> None:
    reasons = {"corrupt": "corrupt or truncated|not an image", "truncated": "corrupt or truncated",
               "empty": "empty file", "bomb": "pixel limit|decompression bomb", "not_an_image": "not an image"}
    paths = []
    for kind in reasons:
        path = tmp_path / f"{kind}.png"
        path.write_bytes(BAD[kind][0]())
        paths.append(path)
    results = fake_recognizer().read(paths + [tmp_path / "missing.png"])
    for result, pattern in zip(results, list(reasons.values()) + ["no such file"]):
        assert not result.ok
        assert __import__("re").search(pattern, result.error), (pattern, result.error)


def test_bad_bytes_and_arrays(fake_recognizer) -> None:
    inputs = [barcode("one"), b"", png_bomb(), np.zeros((3, 0)), _save(barcode("two"), format="PNG")]
    results = fake_recognizer().read(inputs)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert [results[0].text, results[4].text] == ["one", "two"]
    assert "empty image data" in results[1].error


def test_all_bad_batch(fake_recognizer, tmp_path: Path) -> None:
    results = fake_recognizer().read([b"", b"xx", tmp_path / "none.png"])
    assert [r.ok for r in results] == [False, False, False]


def test_odd_files_are_what_they_claim() -> None:
    """Guard for the cases above: the files really have the modes being tested."""
    def opened(kind: str) -> Image.Image:
        return Image.open(io.BytesIO(BAD[kind][0]()))

    assert opened("png16").mode.startswith("I;16") or opened("png16").mode == "I"
    assert opened("cmyk_jpeg").mode == "CMYK"
    assert opened("palette_png").mode == "P"
    gif = opened("animated_gif")
    assert gif.n_frames == 2 and gif.is_animated
    with pytest.raises(Image.DecompressionBombError):
        opened("bomb")
