"""The synthetic word generator: fonts, determinism, charset coverage, LMDB output."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from runtime.charset import CHARSET_36, CHARSET_94
from training.data import open_set
from training.data.fonts import discover_fonts
from training.data.render import WordRenderer
from training.data.synth import SynthWords
from training.data.synth import main as synth_main
from training.data.words import WordSampler


@pytest.fixture(scope="module")
def synth() -> SynthWords:
    return SynthWords(400, seed=7)


def test_fonts_are_found_with_coverage():
    fonts = discover_fonts()
    assert len({f.family for f in fonts}) >= 5  # matplotlib alone gives DejaVu, STIX, CM
    # every charset character is drawn by some font
    assert all(any(c in f.chars for f in fonts) for c in CHARSET_94)
    # small-caps fonts never claim lower case; OT1 Computer Modern never claims "<"
    assert all(not (set(string.ascii_lowercase) & f.chars) for f in fonts if "AmaticSC" in f.path)
    assert all("<" not in f.chars for f in fonts if f.path.endswith("cmr10.ttf"))


def test_deterministic_given_seed(synth):
    again = SynthWords(400, seed=7)
    for i in (0, 5, 399, 123):
        a, la = synth[i]
        b, lb = again[i]
        assert la == lb and a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = SynthWords(400, seed=8)
    assert [other[i][1] for i in range(10)] != [synth[i][1] for i in range(10)]
    with pytest.raises(IndexError):
        synth[400]


def test_samples_look_like_word_crops(synth):
    for i in range(40):
        image, label = synth[i]
        assert image.mode == "RGB" and 1 <= len(label) <= 25
        w, h = image.size
        assert 8 <= h <= 200 and w >= 4
        array = np.asarray(image, dtype=np.float32)
        assert array.std() > 3  # something is drawn, not a flat patch


def test_labels_cover_every_character_class(synth):
    labels = [synth[i][1] for i in range(300)]
    joined = "".join(labels)
    for cls in (string.digits, string.ascii_lowercase, string.ascii_uppercase, string.punctuation):
        assert any(c in cls for c in joined), cls
    assert all(c in CHARSET_94 for c in joined)
    # real words dominate, in several cases
    words = {w.lower() for w in WordSampler().words}
    assert sum(lab.lower() in words for lab in labels) > 120
    assert any(lab.isupper() for lab in labels) and any(lab.istitle() for lab in labels)


def test_every_charset_character_renders():
    renderer = WordRenderer()
    rng, gen = random.Random(0), np.random.default_rng(0)
    for c in CHARSET_94:
        info = renderer.pick_font(c, rng)
        assert info is not None and info.covers(c)
        mask, _, _ = renderer._masks(c, renderer.font(info.path, 28), 0, 0.0)
        assert mask is not None and np.asarray(mask).max() > 100, (c, info.path)
        image = renderer.render(c, rng, gen)
        assert image is not None and min(image.size) >= 1


def test_glyphless_text_is_refused():
    renderer = WordRenderer()
    assert renderer.pick_font("\u4e2d\u6587", random.Random(0)) is None  # no CJK font among them
    assert renderer.render("\u4e2d", random.Random(0), np.random.default_rng(0)) is None


def test_case_insensitive_charset_has_no_hidden_characters():
    ds = SynthWords(60, seed=3, charset="36")
    labels = [ds[i][1] for i in range(60)]
    assert all(c in CHARSET_36 for c in "".join(labels))
    sampler = WordSampler("36")
    assert set(sampler.allowed) == set(string.digits + string.ascii_letters)


def test_cli_writes_lmdb_matching_the_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert synth_main(["-n", "12", "-o", str(out), "--seed", "5"]) == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    lmdb_set = open_set(out, train=True)
    on_the_fly = SynthWords(12, seed=5)
    assert len(lmdb_set) == 12
    for i in (0, 11):
        image, label = lmdb_set[i]
        ref, ref_label = on_the_fly[i]
        assert label == ref_label
        assert np.array_equal(np.asarray(image), np.asarray(ref))  # PNG is lossless


def test_cli_sheet(tmp_path):
    path = tmp_path / "sheet.png"
    assert synth_main(["--sheet", str(path)]) == 0
    assert path.stat().st_size > 10_000


def _colours(image) -> int:
    return len(np.unique(np.asarray(image).reshape(-1, 3), axis=0))


def test_difficulty_zero_is_flat_text_with_the_same_words():
    easy, full = SynthWords(30, seed=3, difficulty=0.0), SynthWords(30, seed=3)
    assert [easy[i][1] for i in range(30)] == [full[i][1] for i in range(30)]
    # a plain background and one fill colour: few distinct colours (anti-aliasing only);
    # the full mix adds noise, gradients, textures and JPEG artefacts
    easy_colours = [_colours(easy[i][0]) for i in range(30)]
    full_colours = [_colours(full[i][0]) for i in range(30)]
    assert np.median(easy_colours) * 4 < np.median(full_colours)
    for i in range(30):  # flat text: the most common colour covers much of the crop
        pixels = np.asarray(easy[i][0]).reshape(-1, 3)
        _, counts = np.unique(pixels, axis=0, return_counts=True)
        assert counts.max() > 0.3 * len(pixels)
    with pytest.raises(ValueError, match="difficulty"):
        WordRenderer(difficulty=1.5)


def test_cli_difficulty_matches_the_dataset(tmp_path):
    out = tmp_path / "easy"
    assert synth_main(["-n", "4", "-o", str(out), "--seed", "2", "--difficulty", "0"]) == 0
    lmdb_set, ref = open_set(out, train=True), SynthWords(4, seed=2, difficulty=0.0)
    assert np.array_equal(np.asarray(lmdb_set[3][0]), np.asarray(ref[3][0]))
    assert ref.name == "synth:4:2:0"


def test_covered_words_hide_inner_characters_of_the_same_picture():
    plain, covered = SynthWords(60, seed=11), SynthWords(60, seed=11, cover_counts=(1, 2))
    assert covered.name.endswith(":cover1-2")
    hidden = 0
    for i in range(60):
        (a, la), (b, lb) = plain[i], covered[i]
        positions = covered.covered(la, i)
        assert la == lb and a.size == b.size  # the same word, font and geometry
        assert all(0 < p < len(la) - 1 for p in positions) and len(positions) in {0, 1, 2}
        assert len(positions) <= (len(la) - 1) // 2  # k covered characters need 2k + 1
        changed = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(axis=2) > 0
        if not positions:
            assert not changed.any()
        else:
            hidden += 1
            assert 0 < changed.mean() < 0.9  # a box over some of the word, not all of it
    assert hidden > 20
    with pytest.raises(ValueError):
        SynthWords(10, cover_counts=(0,))


def test_a_covered_character_is_a_box_of_the_border_colour():
    """Without degradations the covered glyph's ink is gone under one flat box."""
    renderer = WordRenderer(difficulty=0.0)
    a = np.asarray(renderer.render("market", random.Random(3), np.random.default_rng(3)))
    b = np.asarray(renderer.render("market", random.Random(3), np.random.default_rng(3), cover=(2,)))
    ring = np.concatenate([b[:2].reshape(-1, 3), b[-2:].reshape(-1, 3), b[:, :2].reshape(-1, 3),
                           b[:, -2:].reshape(-1, 3)])
    colour = np.median(ring, axis=0).astype(int)
    changed = np.argwhere(np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 0)
    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
    assert (b[y0 : y1 + 1, x0 : x1 + 1] == colour).all()  # the changed region is one flat box
    assert x0 > 0 and x1 < b.shape[1] // 2 + b.shape[0]  # over the third letter, not the word's end


def test_worn_copies_keep_the_size_and_follow_their_seed():
    from PIL import Image

    from training.data.transforms import worn_copy

    crop = Image.new("RGB", (160, 48), "white")
    crop.paste((0, 0, 0), (20, 10, 140, 38))
    first = [worn_copy(crop, random.Random(seed)) for seed in range(4)]
    again = [worn_copy(crop, random.Random(seed)) for seed in range(4)]
    assert all(c.size == crop.size and c.mode == "RGB" for c in first)
    assert [c.tobytes() for c in first] == [c.tobytes() for c in again]  # deterministic per seed
    assert all(c.tobytes() != crop.tobytes() for c in first)  # worn: blurred edges at least
    assert len({c.tobytes() for c in first}) > 1  # the strength is drawn
    tiny = Image.new("RGB", (30, 8), "gray")  # shorter than the smallest height: kept as high
    assert worn_copy(tiny, random.Random(0)).size == tiny.size
