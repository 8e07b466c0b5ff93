"""--views: doubtful crops read again, stretched, and the word the views agree on best; doubtful
tall crops read turned a quarter each way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sample_crops import SAMPLES, sharp_and_blurred

from runtime import cli
from runtime.options import OptionError, RecognizerConfig
from runtime.recognizer import Recognizer
from runtime.views import TurnSettings, ViewSettings, best_of_views, stretched, turned


def _frames(path: list[int], sure: float, classes: int = 4) -> np.ndarray:
    """Log-probabilities whose best path is ``path`` (one class per frame), each frame at ``sure``."""
    out = np.full((len(path), classes), (1.0 - sure) / (classes - 1))
    out[np.arange(len(path)), path] = sure
    return np.log(out)


def test_the_views_outvote_a_doubtful_first_reading() -> None:
    first = _frames([1, 0, 2, 0], 0.4)  # reads "ab", barely
    others = [_frames([1, 0, 3, 3, 0], 0.9), _frames([1, 1, 0, 3, 0, 0], 0.9)]  # both read "ac", surely
    word, view = best_of_views([first, *others], first=np.array([1, 2]))
    assert word.tolist() == [1, 3] and view == 1
    # a sure first reading stands against one doubtful view
    word, view = best_of_views([_frames([1, 0, 2, 0], 0.95), _frames([1, 0, 3, 0], 0.4)], first=np.array([1, 2]))
    assert word.tolist() == [1, 2] and view == 0
    # a word no view reads best (e.g. the decoders' choice) can win: view -1
    def split(best: int, second: int, third: int) -> np.ndarray:
        frames = np.full((3, 5), 1e-4)
        frames[0, 1] = frames[2, 0] = 1.0  # "a", then a blank
        frames[1, [best, second, third]] = 0.4, 0.35, 0.25
        return np.log(frames / frames.sum(-1, keepdims=True))

    word, view = best_of_views([split(2, 3, 4), split(4, 3, 2)], first=np.array([1, 3]))
    assert word.tolist() == [1, 3] and view == -1
    # a view that reads nothing does not erase a word read, however sure it is
    blank = np.log(np.full((4, 4), 0.01) + np.eye(4, 4)[:, :1] * 0.97)
    word, view = best_of_views([_frames([1, 0, 2, 0], 0.3), blank, blank], first=np.array([1, 2]))
    assert word.tolist() == [1, 2] and view == 0
    word, view = best_of_views([blank, blank], first=np.array([], dtype=np.int64))
    assert word.tolist() == [] and view == 0


def test_settings_round_trip_and_refuse_nonsense() -> None:
    settings = ViewSettings((1.1, 1.2), 0.8)
    assert ViewSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert ViewSettings.from_manifest({"defaults": {"views": settings.to_dict()}}) == settings
    assert ViewSettings.from_manifest({"defaults": {}}) is None
    assert settings.wants("", 1.0) and settings.wants("ab", 0.5) and not settings.wants("ab", 0.9)
    for bad in ({"stretches": [], "below_confidence": 0.5}, {"stretches": [9], "below_confidence": 0.5},
                {"stretches": [1.1], "below_confidence": 2}):
        with pytest.raises(ValueError):
            ViewSettings.from_dict(bad)
    with pytest.raises(ValueError, match="defaults.views"):
        ViewSettings.from_manifest({"defaults": {"views": {"stretches": [1.1]}}})
    image = Image.new("RGB", (40, 10))
    assert stretched(image, 1.25).size == (50, 10)


def _bundle_with_views(tmp_path: Path, views: dict | None) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(cli.DEFAULT_BUNDLE, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.setdefault("defaults", {}).pop("views", None)
    if views is not None:
        manifest["defaults"]["views"] = views
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_only_doubtful_crops_are_read_again_stretched(tmp_path: Path) -> None:
    bundle = _bundle_with_views(tmp_path, {"stretches": [1.5], "below_confidence": 0.8})
    reader = Recognizer.from_bundle(bundle, llm="none", decode="ctc", precision="fp32", threads=1)
    one_view = Recognizer.from_bundle(bundle, llm="none", decode="ctc", precision="fp32", threads=1, views="off")
    assert reader.views == ViewSettings((1.5,), 0.8) and one_view.views is None
    widths: list[int] = []
    run = reader.backend.run
    reader.backend.run = lambda graph, feeds: widths.append(feeds["images"].shape[-1]) or run(graph, feeds)
    images = sharp_and_blurred()
    results, plain = reader.read(images, batch_size=1), one_view.read(images, batch_size=1)
    doubtful = [i for i, r in enumerate(plain) if not r.text or r.confidence < 0.8]
    assert 0 < len(doubtful) < len(images)  # the blur makes some words doubtful, not all
    assert len(widths) == len(images) + len(doubtful)  # one more encoder call per doubtful crop
    for i, result in enumerate(results):
        again = result.timings_ms["image_encoder_views"] > 0
        assert again == (i in doubtful)
        if i not in doubtful:
            assert result.text == plain[i].text
    assert all(plain[i].timings_ms["image_encoder_views"] == 0 for i in range(len(images)))


def test_a_bundle_without_views_reads_one_view(tmp_path: Path) -> None:
    reader = Recognizer.from_bundle(_bundle_with_views(tmp_path, None), llm="none", threads=1)
    assert reader.views is None
    assert reader.read(SAMPLES / "open.png")[0].text.lower() == "open"


def test_options_check_the_views(tmp_path: Path) -> None:
    bundle = _bundle_with_views(tmp_path, {"stretches": "wide", "below_confidence": 0.8})
    with pytest.raises(OptionError, match="views"):
        RecognizerConfig(engine=str(bundle), llm="none").check()
    RecognizerConfig(engine=str(bundle), llm="none", views="off").check()  # off never reads them
    with pytest.raises(OptionError, match="--views"):
        RecognizerConfig(llm="none", views="sideways").check()
    assert cli.main(["--views", "sideways", str(SAMPLES / "open.png")]) == 2


def test_the_threshold_with_the_most_words_gained_is_chosen() -> None:
    from export.views import ViewReadings, choose

    labels = ["cat", "dog", "sun", "map"]
    # one view: cat right (sure), dog wrong (0.6), sun right (0.85), map wrong (0.4)
    a = ViewReadings("a", labels, ["cat", "dig", "sun", "mop"], [0.99, 0.6, 0.85, 0.4], ["cat", "dog", "son", "map"])
    choice = choose([a], grid=(0.5, 0.7, 0.9))
    by = {t["below_confidence"]: t for t in choice["tried"]}
    assert by[0.5]["gain"] == 1 and by[0.7]["gain"] == 2 and by[0.9]["gain"] == 1  # 0.9 also breaks "sun"
    assert choice["below_confidence"] == 0.7 and choice["sets"]["a"]["views"] == 100.0
    # a set that would read worse vetoes the threshold; nothing gained: nothing chosen
    b = ViewReadings("b", ["cat"], ["cat"], [0.6], ["cot"])
    assert choose([a, b], grid=(0.7,))["below_confidence"] is None


def test_export_views_writes_what_it_chose(tmp_path: Path) -> None:
    import export.views as export_views

    bundle = _bundle_with_views(tmp_path, None)
    folder = tmp_path / "val"
    (folder / "images").mkdir(parents=True)
    lines = []
    for k, image in enumerate(sharp_and_blurred()):
        image.save(folder / "images" / f"{k}.png")
        lines.append(f"{k}.png\t{sorted(SAMPLES.glob('*.png'))[k // 2].stem}\n")
    (folder / "labels.tsv").write_text("".join(lines))
    assert export_views.main([str(bundle), "--validation", str(folder), "--stretches", "1.5", "--precision", "fp32",
                              "--threads", "1", "--json"]) == 0
    section = json.loads((bundle / "manifest.json").read_text())["defaults"].get("views")
    reader = Recognizer.from_bundle(bundle, llm="none", threads=1)  # the manifest still verifies
    if section is None:
        assert reader.views is None
    else:
        assert section["stretches"] == [1.5] and section["chosen_by"] == "python -m export.views"
        assert reader.views == ViewSettings((1.5,), section["below_confidence"])
        assert section["gain"] == sum(s["fixed"] - s["broken"] for s in section["sets"].values()) > 0
    assert export_views.main([str(bundle), "--validation", str(folder), "--stretches", "9"]) == 2


def test_turn_settings_round_trip_and_rules() -> None:
    turns = TurnSettings(1.0, 0.9, 0.2)
    settings = ViewSettings((), 1.0, turns)  # turns alone: no stretched view
    assert ViewSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert not settings.wants("", 0.0)
    assert turns.wants((20, 60), "ab", 0.5) and turns.wants((20, 20), "", 1.0)
    assert not turns.wants((60, 20), "", 0.0)  # wide crops are never turned
    assert not turns.wants((20, 60), "ab", 0.95)  # a sure reading stands
    assert turns.prefers(("ab", 0.5), ("cd", 0.75)) and not turns.prefers(("ab", 0.5), ("cd", 0.65))
    assert turns.prefers(("", 1.0), ("cd", 0.3))  # nothing read counts as no confidence
    assert not turns.prefers(("", 1.0), ("", 1.0))  # a turned reading of nothing never wins
    for bad in ({"min_aspect": 0, "below_confidence": 0.5, "margin": 0.1},
                {"min_aspect": 1, "below_confidence": 1.5, "margin": 0.1},
                {"min_aspect": 1, "below_confidence": 0.5, "margin": 1.0}):
        with pytest.raises(ValueError, match="turns"):
            ViewSettings.from_dict({"stretches": [], "below_confidence": 1.0, "turns": bad})
    image = Image.new("RGB", (40, 10))
    assert turned(image, clockwise=True).size == turned(image, clockwise=False).size == (10, 40)


def test_a_word_written_up_or_down_a_pole_is_read_turned(tmp_path: Path) -> None:
    views = {"stretches": [], "below_confidence": 1.0, "turns": {"min_aspect": 1.0, "below_confidence": 0.9,
                                                                  "margin": 0.2}}
    bundle = _bundle_with_views(tmp_path, views)
    reader = Recognizer.from_bundle(bundle, llm="none", precision="fp32", threads=1)
    upright = Recognizer.from_bundle(bundle, llm="none", precision="fp32", threads=1, views="off")
    calls: list[int] = []
    run = reader.backend.run
    reader.backend.run = lambda graph, feeds: calls.append(len(feeds.get("images", ()))) or run(graph, feeds)
    word = Image.open(SAMPLES / "open.png").convert("RGB")
    up, down = word.transpose(Image.Transpose.ROTATE_90), word.transpose(Image.Transpose.ROTATE_270)
    results = reader.read([up, down, word], batch_size=1)
    assert [r.text.lower() for r in results] == ["open", "open", "open"]
    assert [r.text.lower() for r in upright.read([up, down], batch_size=1)] != ["open", "open"]
    assert results[2].timings_ms["image_encoder_views"] == 0  # a wide crop is never turned
    assert results[0].timings_ms["image_encoder_views"] > 0


def test_the_turns_that_gain_most_are_chosen() -> None:
    from export.views import TurnReadings, choose_turns

    labels = ["pole", "sign", "6", "exit"]
    upright = [("", 1.0), ("s1gn", 0.5), ("6", 0.99), ("exit", 0.95)]
    aspect = [3.0, 1.2, 1.4, 0.3]
    sideways = {0: [("pole", 0.9), ("elop", 0.1)], 1: [("sign", 0.8), ("ugis", 0.2)], 2: [("9", 0.99), ("6", 0.2)]}
    choice = choose_turns([TurnReadings("a", labels, upright, aspect, sideways)])
    assert choice["gain"] == 2 and choice["sets"]["a"]["broken"] == 0
    assert choice["turns"].min_aspect <= 1.2  # "sign" is only 1.2 times as tall as wide
    # a set read worse vetoes: turning "6" (aspect 1.4, sure) would break it, so it is never chosen
    assert all(t["sets"]["a"]["broken"] == 0 for t in choice["tried"] if t["holds"] and t["gain"] > 0)
    nothing = TurnReadings("b", ["6"], [("6", 0.99)], [1.4], {0: [("9", 0.999), ("6", 0.1)]})
    assert choose_turns([nothing])["turns"] is None


def test_export_views_fits_turns_and_keeps_them(tmp_path: Path) -> None:
    import export.views as export_views

    bundle = _bundle_with_views(tmp_path, None)
    folder = tmp_path / "val"
    (folder / "images").mkdir(parents=True)
    lines = []
    for k, path in enumerate(sorted(SAMPLES.glob("*.png"))):
        word = Image.open(path).convert("RGB")
        for j, image in enumerate((word, word.transpose(Image.Transpose.ROTATE_90))):  # upright and written upwards
            image.save(folder / "images" / f"{k}_{j}.png")
            lines.append(f"{k}_{j}.png\t{path.stem}\n")
    (folder / "labels.tsv").write_text("".join(lines))
    common = [str(bundle), "--validation", str(folder), "--stretches", "1.5", "--precision", "fp32", "--threads", "1"]
    assert export_views.main([*common, "--turns"]) == 0
    section = json.loads((bundle / "manifest.json").read_text())["defaults"]["views"]
    assert section["turns"]["gain"] > 0 and section["turns"]["sets"]
    turns = TurnSettings.from_dict(section["turns"])
    assert Recognizer.from_bundle(bundle, llm="none", threads=1).views.turns == turns
    assert export_views.main(common) == 0  # refitting the stretches keeps the turns
    again = json.loads((bundle / "manifest.json").read_text())["defaults"]["views"]
    assert TurnSettings.from_dict(again["turns"]) == turns and again["turns"]["gain"] == section["turns"]["gain"]
