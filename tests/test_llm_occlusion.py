"""Occluded word sets for measuring the LLM corrector (benchmarks/occlusion.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import data_path

from benchmarks.occlusion import (
    CharBoxes,
    border_colour,
    build,
    choose_positions,
    main,
    padded_boxes,
    read_charboxes,
)

IIIT5K = data_path("train", "iiit5k_train_2000")
BACKGROUND = (200, 180, 40)


def synthetic_set(root: Path) -> Path:
    """Two words on a flat background, each character a dark block inside its box."""
    (root / "images").mkdir(parents=True)
    lines = []
    for name, word in (("a.png", "HOUSE"), ("b.png", "ab")):
        image = np.zeros((30, 12 * len(word) + 4, 3), np.uint8)
        image[:] = BACKGROUND
        boxes = []
        for i in range(len(word)):
            x = 2 + 12 * i
            image[5:25, x + 1:x + 11] = (10 + 40 * i, 20, 30)
            boxes.append(f"{x},5,12,20")
        Image.fromarray(image).save(root / "images" / name)
        lines.append(f"{name}\t{word}\t{';'.join(boxes)}")
    (root / "charboxes.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_read_charboxes_and_errors(tmp_path: Path) -> None:
    words = read_charboxes(synthetic_set(tmp_path / "src") / "charboxes.tsv")
    assert words[0] == CharBoxes("a.png", "HOUSE", tuple((2 + 12 * i, 5, 12, 20) for i in range(5)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("x.png\tabc\t1,2,3,4;5,6,7,8\n")
    with pytest.raises(ValueError, match="2 boxes for 3 characters"):
        read_charboxes(bad)


def test_positions_are_inner_distinct_and_seeded() -> None:
    word = CharBoxes("w.png", "station", tuple((i, 0, 1, 1) for i in range(7)))
    for count in (1, 2, 3):
        positions = choose_positions(word, count)
        assert len(set(positions)) == count and all(1 <= p <= 5 for p in positions)
        assert positions == choose_positions(word, count)  # deterministic
    assert choose_positions(CharBoxes("w.png", "ab", ((0, 0, 1, 1), (1, 0, 1, 1))), 1) is None
    assert choose_positions(CharBoxes("w.png", "abc", tuple((i, 0, 1, 1) for i in range(3))), 2) is None


def test_padding_never_enters_a_visible_neighbour() -> None:
    word = CharBoxes("w.png", "abcd", ((0, 0, 10, 10), (10, 0, 10, 10), (20, 0, 10, 10), (30, 0, 10, 10)))
    assert padded_boxes(word, [1], 2) == [(10, -2, 10, 14)]
    assert padded_boxes(word, [1, 2], 2) == [(10, -2, 12, 14), (18, -2, 12, 14)]
    spaced = CharBoxes("w.png", "abc", ((0, 0, 5, 5), (10, 0, 5, 5), (20, 0, 5, 5)))
    assert padded_boxes(spaced, [1], 3) == [(7, -3, 11, 11)]


def test_build_covers_exactly_the_boxes(tmp_path: Path) -> None:
    src = synthetic_set(tmp_path / "src")
    out = tmp_path / "out"
    assert build(src, out, counts=(1, 2), pad=0) == 2  # "ab" has no inner character
    labels = (out / "labels.tsv").read_text().splitlines()
    details = [line.split("\t") for line in (out / "occlusions.tsv").read_text().splitlines()]
    assert [line.split("\t")[1] for line in labels] == ["HOUSE", "HOUSE"]
    original = np.asarray(Image.open(src / "images" / "a.png").convert("RGB"))
    for name, label, positions, boxes, colour in details:
        assert label == "HOUSE" and tuple(int(v) for v in colour.split(",")) == BACKGROUND
        image = np.asarray(Image.open(out / "images" / name))
        changed = np.zeros(image.shape[:2], bool)
        for box in boxes.split(";"):
            x, y, w, h = (int(v) for v in box.split(","))
            assert (image[y:y + h, x:x + w] == BACKGROUND).all()
            changed[y:y + h, x:x + w] = True
        assert (image[~changed] == original[~changed]).all()  # nothing else touched
        assert name.startswith("a_o") and name.endswith(positions.replace(",", "-") + ".png")


def test_cli(tmp_path: Path, capsys) -> None:
    src = synthetic_set(tmp_path / "src")
    assert main([str(src), str(tmp_path / "out"), "--counts", "2", "--limit", "1"]) == 0
    assert "wrote 1 occluded images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "o2")])


@pytest.mark.skipif(not (IIIT5K / "charboxes.tsv").is_file(), reason="shared IIIT5K data not present")
def test_real_words_are_covered_where_the_boxes_say(tmp_path: Path) -> None:
    out = tmp_path / "occ"
    n = build(IIIT5K, out, counts=(1, 2), limit=6)
    assert n > 6
    for line in (out / "occlusions.tsv").read_text().splitlines():
        name, label, positions, boxes, colour = line.split("\t")
        stem = name.split("_o")[0]
        original = Image.open(IIIT5K / "images" / f"{stem}.png").convert("RGB")
        assert border_colour(original) == tuple(int(v) for v in colour.split(","))
        before, after = np.asarray(original).astype(int), np.asarray(Image.open(out / "images" / name)).astype(int)
        inside = np.zeros(before.shape[:2], bool)
        for box in boxes.split(";"):
            x, y, w, h = (int(v) for v in box.split(","))
            x0, y0 = max(0, x), max(0, y)
            inside[y0:y + h, x0:x + w] = True
            assert (after[y0:y + h, x0:x + w] == after[y0, x0]).all()  # one flat fill
        assert (after[~inside] == before[~inside]).all()
        assert inside.any() and (after[inside] != before[inside]).any()
        assert len(positions.split(",")) == int(name.split("_o")[1][0])
