"""Whole photos: a photo composed here (words rendered at known places) is read end to end,
bad photos give one error or an empty list each, and --detect without the extra says what
to install in one line."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from runtime import cli
from runtime.detect.settings import DetectUnavailable, check_available

try:
    check_available()
    DETECT = None
except DetectUnavailable as exc:  # CI without the detect extra: only the "absent" tests run
    DETECT = str(exc)
needs_detect = pytest.mark.skipif(DETECT is not None, reason=f"the detect extra is not installed ({DETECT})")

#: (line, left, top, font size): two words on one line (a space to find) and one below
LINES = [("COFFEE HOUSE", 60, 70, 64), ("Open", 140, 230, 72)]


def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        from training.data.fonts import font_files
    except ImportError:
        pytest.skip("training.data.fonts (the train extra's fonts) is not importable")
    names = {p.name: p for p in font_files()}
    for name in ("Roboto-Bold.ttf", "Roboto-Regular.ttf", "SourceSansPro-Bold.otf"):
        if name in names:
            return ImageFont.truetype(str(names[name]), size)
    if not names:
        pytest.skip("no font of the train extra is installed")
    return ImageFont.truetype(str(sorted(names.values())[0]), size)


def compose() -> tuple[Image.Image, list[tuple[list[tuple[float, float]], str]]]:
    """A 640x360 photo: a soft gradient with noise, the words drawn dark; their boxes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:360, 0:640]
    base = 200 + 30 * np.sin(x / 90.0) + 15 * np.cos(y / 70.0)
    pixels = np.clip(base[..., None] + rng.normal(0, 4, (360, 640, 3)), 0, 255).astype(np.uint8)
    photo = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(photo)
    truth = []
    for line, left, top, size in LINES:
        font = _font(size)
        canvas.text((left, top), line, font=font, fill=(30, 25, 60))
        offset = 0.0
        for text in line.split(" "):
            x0, y0, x1, y1 = canvas.textbbox((left + offset, top), text, font=font)
            truth.append(([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], text))
            offset += font.getlength(text + " ")
    return photo.filter(ImageFilter.GaussianBlur(0.6)), truth


@pytest.fixture(scope="module")
def recognizer():
    from runtime.recognizer import Recognizer

    with Recognizer.from_bundle(llm="none") as r:
        yield r


@needs_detect
def test_composed_photo_is_read_end_to_end(recognizer) -> None:
    from benchmarks.e2e import score_photo

    photo, truth = compose()
    result = recognizer.read_photos(photo)[0]
    assert result.ok and (result.width, result.height) == (640, 360)
    words = [([tuple(p) for p in w.polygon], w.text) for w in result.words]
    tally = score_photo(truth, words)
    assert tally.counted == len(truth), f"read {[(w.text, w.polygon) for w in result.words]}"
    # reading order: the two words of the first line, then the one below
    texts = [w.text.lower() for w in sorted(result.words, key=lambda w: w.order)]
    assert texts[:3] == ["coffee", "house", "open"]
    assert result.words[0].line == result.words[1].line != result.words[2].line


def _bad_photos(tmp_path: Path) -> dict[str, object]:
    from test_bad_input import png_bomb

    photo, _ = compose()
    good = tmp_path / "good.png"
    photo.save(good)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_bomb(20_000, 20_000))
    bomb = tmp_path / "bomb.png"  # a real, tiny file that decodes to 144 megapixels
    Image.new("L", (12_000, 12_000)).save(bomb, optimize=True)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (255, 255, 255)).save(one)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (800, 600), (240, 240, 235)).save(blank)
    cmyk = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(cmyk)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(deep)
    return {"truncated": truncated, "huge": huge, "good": good, "bomb": bomb, "one": one, "blank": blank,
            "cmyk": cmyk, "deep": deep}


@needs_detect
def test_bad_photos_one_error_or_empty_each(recognizer, tmp_path: Path) -> None:
    photos = _bad_photos(tmp_path)
    results = dict(zip(photos, recognizer.read_photos(list(photos.values()))))
    for name in ("truncated", "huge", "bomb"):
        assert results[name].error and "\n" not in results[name].error, name
    assert "pixel limit" in results["huge"].error and "pixel limit" in results["bomb"].error
    for name in ("one", "blank"):
        assert results[name].ok and results[name].words == [], name
    for name in ("good", "cmyk", "deep"):  # read whatever came before and after
        assert results[name].ok, name
        assert {w.text.lower() for w in results[name].words} >= {"coffee", "house"}, name


@needs_detect
def test_cli_detect_plain_json_and_draw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = _bad_photos(tmp_path)
    status = cli.main(["--detect", "--llm", "none", str(photos["good"]), str(photos["truncated"]),
                       str(photos["blank"]), "--draw", str(tmp_path / "drawn")])
    out, err = capsys.readouterr()
    assert status == cli.EXIT_SOME_FAILED
    rows = [line.split("\t") for line in out.splitlines()]
    assert all(len(r) == 3 and r[0] == str(photos["good"]) and len(r[1].split(",")) == 8 for r in rows)
    assert {r[2].lower() for r in rows} >= {"coffee", "house", "open"}
    assert err.count("error:") == 1 and "truncated.jpg" in err
    assert (tmp_path / "drawn" / "good.png").is_file() and (tmp_path / "drawn" / "blank.png").is_file()
    assert cli.main(["--detect", "--json", "--llm", "none", str(photos["good"]), str(photos["blank"])]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in records] == [str(photos["good"]), str(photos["blank"])]
    assert records[1]["words"] == []
    assert {"text", "polygon", "confidence", "line", "order"} <= set(records[0]["words"][0])


@pytest.mark.parametrize("missing", ["pyclipper", "cv2", "rapidocr"])
def test_detect_extra_absent_says_what_to_install(missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(photo)

    def never(*_a: object) -> None:
        raise AssertionError("the recognizer must not be loaded when --detect cannot run")

    assert cli.main(["--detect", str(photo)], make_recognizer=never) == cli.EXIT_CANNOT_RUN
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "pip install 'clipllama[detect]'" in err and err.startswith("error: --detect:")
    if importlib.util.find_spec("ray") is None:
        return
    from serving import batch, serve

    for entry, argv in ((serve.main, ["--detect"]), (batch.main, [str(photo), "-o", str(tmp_path / "o"), "--detect"])):
        assert entry(argv) == cli.EXIT_CANNOT_RUN  # said before Ray starts
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "pip install 'clipllama[detect]'" in err, err


def test_draw_needs_detect(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main([str(tmp_path), "--draw", str(tmp_path)]) == cli.EXIT_CANNOT_RUN
    assert capsys.readouterr().err.strip() == "error: --draw needs --detect"


def test_detector_settings_from_the_manifest() -> None:
    from runtime.detect.settings import DEFAULT_SHA256, detector_settings

    assert detector_settings({}).sha256 == DEFAULT_SHA256  # bundles made before detection
    assert detector_settings({"detector": {"unclip_ratio": 2.0, "mean": [0.4, 0.4, 0.4]}}).unclip_ratio == 2.0
    with pytest.raises(ValueError, match="unknown keys unclip"):
        detector_settings({"detector": {"unclip": 2.0}})


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="the detect extra is not installed")
def test_words_at_spaces_cuts_and_over_long_words() -> None:
    from runtime.detect.words import MAX_CHARS, LineChars, split_words

    def line(text: str, pitch: float = 20.0) -> LineChars:
        return LineChars(list(text), [10.0 + pitch * i for i in range(len(text))], 20.0 * len(text) + 20)

    words = split_words(line("DaysInn PUB&BREWERY"), margin=0.15)
    assert [w.line_text for w in words] == ["Days", "Inn", "PUB", "&", "BREWERY"]
    assert words[0].x0 == 0.0 and words[-1].x1 == line("DaysInn PUB&BREWERY").width  # the line's ends
    assert all(a.x1 <= b.x0 for a, b in zip(words, words[1:]))
    long = split_words(line("A" * 60), margin=0.15)
    assert len(long) == 1 and len(long[0].pieces) == 3  # one word, read in pieces of at most 25
    edges = [long[0].x0] + [x for piece in long[0].pieces for x in piece] + [long[0].x1]
    assert edges == sorted(edges)
    sizes = [round((b - a) / 20.0) for a, b in long[0].pieces]
    assert max(sizes) <= MAX_CHARS + 1 and sum(sizes) >= 60
