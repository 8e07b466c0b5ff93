"""--specialist: a fine-tuned bundle's trained tower reads the crops its general tower doubts,
and its reading wins only where it is surer; how training.finetune chooses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sample_crops import SAMPLES, sharp_and_blurred

from runtime import cli
from runtime.options import OptionError, RecognizerConfig
from runtime.recognizer import Recognizer
from runtime.specialist import GRAPH_NAME, Specialist, SpecialistSettings, check_specialist
from training.specialist_fit import VAL, choose_specialist, gated


def test_settings_round_trip_and_rules() -> None:
    settings = SpecialistSettings(0.8, 0.1)
    assert SpecialistSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert SpecialistSettings.from_manifest({"defaults": {"specialist": {"below_confidence": 0.8}}}) == \
        SpecialistSettings(0.8)
    assert SpecialistSettings.from_manifest({"defaults": {}}) is None
    with pytest.raises(ValueError, match="defaults.specialist"):
        SpecialistSettings.from_manifest({"defaults": {"specialist": {"margin": 0.1}}})
    for bad in ((0.0, 0.0), (1.5, 0.0), (0.5, 1.0)):
        with pytest.raises(ValueError):
            SpecialistSettings(*bad)
    assert settings.wants("", 1.0) and settings.wants("ab", 0.7) and not settings.wants("ab", 0.8)
    assert settings.prefers(("ab", 0.5), ("cd", 0.61)) and not settings.prefers(("ab", 0.5), ("cd", 0.6))
    assert settings.prefers(("", 1.0), ("cd", 0.2))  # a general reading of nothing counts as 0
    assert not settings.prefers(("ab", 0.1), ("", 1.0))  # the specialist reading nothing never wins
    assert settings.choose(("ab", 0.9), ("cd", 1.0)) == "ab"  # a sure general reading is never asked
    assert settings.choose(("ab", 0.5), ("cd", 0.9)) == "cd" and settings.choose(("ab", 0.5), None) == "ab"


def _log_probs(codec, text: str, rows: int, frames: int) -> np.ndarray:
    """CTC log-probabilities ``(rows, frames, C+1)`` whose best path reads ``text`` surely."""
    out = np.full((rows, frames, codec.num_classes), np.log(1e-4 / codec.num_classes), dtype=np.float32)
    path = [c for i in codec.ids(text) for c in (int(i), 0)]
    out[:, :, 0] = 0.0
    out[:, : len(path), 0] = np.log(1e-4)
    for t, c in enumerate(path):
        out[:, t, c] = 0.0
    return out


class _FakeBackend:
    """Reads every crop as ``text``, surely; counts the crops it was given."""

    def __init__(self, codec, text: str) -> None:
        self.codec, self.text, self.crops = codec, text, 0

    def run(self, graph: str, feeds: dict) -> dict:
        assert graph == GRAPH_NAME
        images = feeds["images"]
        self.crops += len(images)
        return {"ctc_log_probs": _log_probs(self.codec, self.text, len(images), images.shape[-1] // 8)}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("decode", ["ctc", "cascade"])
def test_only_doubtful_crops_are_asked_and_a_surer_reading_wins(decode: str) -> None:
    plain = Recognizer.from_bundle(None, llm="none", decode=decode, precision="fp32", threads=1, views="off")
    reader = Recognizer.from_bundle(None, llm="none", decode=decode, precision="fp32", threads=1, views="off")
    assert reader.specialist is None  # the embedded bundle has none
    backend = _FakeBackend(reader.codec, "zq")
    reader.specialist = Specialist(SpecialistSettings(0.8), backend)
    images = sharp_and_blurred()
    before, after = plain.read(images, batch_size=1), reader.read(images, batch_size=1)
    doubtful = [i for i, r in enumerate(before) if not r.text or r.confidence < 0.8]
    assert 0 < len(doubtful) < len(images)  # the blur makes some words doubtful, not all
    assert backend.crops == len(doubtful)
    for i, (old, new) in enumerate(zip(before, after)):
        assert new.text == ("zq" if i in doubtful else old.text)
        assert (new.timings_ms["image_encoder_specialist"] > 0) == (i in doubtful)
    # a specialist that reads nothing never erases a word
    reader.specialist = Specialist(SpecialistSettings(1.0), _FakeBackend(reader.codec, ""))
    assert [r.text for r in reader.read(images, batch_size=4)] == [r.text for r in before]


def test_options_check_the_specialist(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--specialist"):
        RecognizerConfig(llm="none", specialist="always").check()
    assert cli.main(["--specialist", "always", str(SAMPLES / "open.png")]) == 2
    assert cli.main(["--specialist", "1.5", str(SAMPLES / "open.png")]) == 2
    with pytest.raises(OptionError, match="has no specialist"):  # a threshold needs a specialist
        RecognizerConfig(llm="none", specialist="0.5").check()
    root = tmp_path / "bundle"
    shutil.copytree(cli.DEFAULT_BUNDLE, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["defaults"]["specialist"] = {"below_confidence": 0.9}  # but no graph
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="specialist_encoder"):
        RecognizerConfig(engine=str(root), llm="none").check()
    RecognizerConfig(engine=str(root), llm="none", specialist="off").check()


def test_the_specialist_is_chosen_on_validation_within_the_keep_tolerance() -> None:
    labels = {VAL: ["ab", "cd", "ef", "gh"], "keep": ["ij", "kl", "mn", "op"]}
    original = {VAL: [("ab", 0.95), ("xx", 0.4), ("yy", 0.6), ("zz", 0.85)],
                "keep": [("ij", 0.99), ("kl", 0.65), ("mn", 0.99), ("op", 0.45)]}
    # the specialist reads the domain's doubtful words, but breaks a doubtful general word
    special = {VAL: [("ab", 0.99), ("cd", 0.9), ("ef", 0.9), ("gh", 0.95)],
               "keep": [("ij", 0.99), ("kk", 0.7), ("mn", 0.99), ("oo", 0.3)]}
    row, rows = choose_specialist({0.0: original}, special, labels, tolerance=0.0, grid=(0.5, 0.7, 0.9))
    assert row["below"] == 0.5 and row["val_ctc"] == 50.0 and row["keep_ctc"]["keep"] == 100.0
    assert {r["below"] for r in rows} == {None, 0.5, 0.7, 0.9}
    by_below = {r["below"]: r for r in rows}
    assert by_below[0.7]["keep_ctc"]["keep"] == 75.0 and by_below[0.9]["val_ctc"] == 100.0  # too costly for keep
    assert by_below[0.5]["asked_pct"] == 25.0
    row, _ = choose_specialist({0.0: original}, special, labels, tolerance=25.0, grid=(0.5, 0.7, 0.9))
    assert row["below"] == 0.9 and row["val_ctc"] == 100.0
    # a specialist that adds nothing is not shipped (ties go to the general tower alone)
    row, _ = choose_specialist({0.0: original}, original, labels, tolerance=1.0)
    assert row["below"] is None
    assert gated(original[VAL], special[VAL], None) == ["ab", "xx", "yy", "zz"]
    # a word the original read right and the specialist breaks counts, even where another keep
    # word it fixes makes the net accuracy even
    swapped = {VAL: original[VAL], "keep": [("ij", 0.6), ("kk", 0.5), ("mn", 0.99), ("op", 0.99)]}
    trade = {VAL: special[VAL], "keep": [("ii", 0.9), ("kl", 0.9), ("mn", 0.99), ("op", 0.99)]}
    row, rows = choose_specialist({0.0: swapped}, trade, labels, tolerance=0.0, grid=(0.7,))
    assert row["below"] is None
    assert rows[1]["keep_ctc"]["keep"] == 75.0 == rows[0]["keep_ctc"]["keep"] and rows[1]["keep_broken"]["keep"] == 25.0
    row, _ = choose_specialist({0.0: swapped}, trade, labels, tolerance=25.0, grid=(0.7,))
    assert row["below"] == 0.7
    # a keep set whose path is "val" (``--keep val``) is a keep set, not the validation set
    with_val = {**labels, "val": labels["keep"]}
    row, _ = choose_specialist({0.0: {**original, "val": original["keep"]}}, {**special, "val": special["keep"]},
                               with_val, tolerance=0.0, grid=(0.5, 0.7, 0.9))
    assert row["below"] == 0.5 and row["val_ctc"] == 50.0 and row["keep_ctc"]["val"] == 100.0


@pytest.mark.slow
def test_an_exported_specialist_reads_as_the_tower_it_came_from(tmp_path: Path) -> None:
    pytest.importorskip("rapidocr", reason="the PP-OCR tower needs the rapidocr package (train extra)")
    pytest.importorskip("torch")
    from export.specialist import add_specialist
    from training.checkpoint import load_checkpoint

    root = tmp_path / "bundle"
    shutil.copytree(cli.DEFAULT_BUNDLE, root)
    model = load_checkpoint(root)
    section = add_specialist(root, model, SpecialistSettings(0.9), {"val_ctc": 50.0})
    assert section == {"below_confidence": 0.9, "margin": 0.0, "val_ctc": 50.0}
    reader = Recognizer.from_bundle(root, llm="none", precision="fp32", threads=1, decode="ctc", views="off")
    assert reader.specialist is not None and reader.specialist.settings == SpecialistSettings(0.9)
    assert check_specialist(reader.bundle, "off") is None
    assert check_specialist(reader.bundle, "0.5") == SpecialistSettings(0.5)  # the user's trade, no retraining
    from runtime.preprocess import preprocess

    images = preprocess(sharp_and_blurred()[:2], reader.bundle.preprocessing)
    general = reader.backend.run("image_encoder", {"images": images})["ctc_log_probs"]
    np.testing.assert_allclose(reader.specialist.log_probs(images), general, atol=1e-3)
    # the same tower is never surer than itself: every word as without it
    plain = Recognizer.from_bundle(root, llm="none", precision="fp32", threads=1, decode="ctc", views="off",
                                   specialist="off")
    assert plain.specialist is None
    assert [r.text for r in reader.read(sharp_and_blurred())] == [r.text for r in plain.read(sharp_and_blurred())]
    # the specialist is read in fp32 only: other precisions derived later leave it out
    from export.onnx import add_precisions

    manifest = add_precisions(root, ["fp16"], lint=False)
    assert GRAPH_NAME in manifest["graphs"]["fp32"] and GRAPH_NAME not in manifest["graphs"]["fp16"]
    with Recognizer.from_bundle(root, llm="none", precision="fp16", threads=1, decode="ctc", views="off") as half:
        assert half.specialist is not None and half.read(sharp_and_blurred()[:1])[0].ok
    # ``full`` reads with the decoders alone: no specialist session is opened
    with Recognizer.from_bundle(root, llm="none", precision="fp32", threads=1, decode="full", views="off") as full:
        assert full.specialist is None
