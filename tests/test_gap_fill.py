"""Filling CTC gaps with the decoders' characters (``joint.fill_gaps``): the edit alignment,
the fill itself, the rescoring that uses it, its setting, and the cascade that routes words
with a gap to the decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import cli
from runtime.correction.settings import CorrectionSettings, SettingsError
from runtime.decoding import CharCodec, ctc_rescored, gap_filled, insertions, softmax

CODEC = CharCodec("36")
SAMPLES = Path(cli.DEFAULT_BUNDLE).parent / "samples"


def _ids(text: str) -> list[int]:
    return CODEC.ids(text).tolist()


def _text(ids: np.ndarray | None) -> str | None:
    return None if ids is None else "".join(CODEC.charset[i - 1] for i in ids)


def test_insertions_are_placed_at_the_reading_slots() -> None:
    assert insertions(_ids("crd"), _ids("card")) == {1: _ids("a")}
    assert insertions(_ids("crd"), _ids("core")) == {1: _ids("o")}  # the e for d is a substitution
    assert insertions(_ids("station"), _ids("station")) == {}
    assert insertions(_ids("hllo"), _ids("hello")) == {1: _ids("e")}
    assert insertions(_ids("ab"), _ids("axyb")) == {1: _ids("xy")}


def test_gap_filled_keeps_every_character_read_and_respects_the_room() -> None:
    assert _text(gap_filled(_ids("crd"), _ids("core"), {1: 2})) == "cord"  # d stays d
    assert _text(gap_filled(_ids("crd"), _ids("card"), {1: 1})) == "card"
    assert gap_filled(_ids("crd"), _ids("card"), {2: 1}) is None  # no gap where it inserts
    assert gap_filled(_ids("ab"), _ids("axyb"), {1: 1}) is None  # two characters, room for one
    assert _text(gap_filled(_ids("ab"), _ids("axyb"), {1: 2})) == "axyb"
    assert gap_filled(_ids("crd"), _ids("crd"), {1: 2}) is None


def _decoder_probs(text: str, steps: int = 8, sure: float = 8.0) -> np.ndarray:
    logits = np.zeros((steps, CODEC.num_classes), dtype=np.float32)
    for position, token in enumerate([*CODEC.ids(text), CODEC.eos_id][:steps]):
        logits[position, token] = sure
    return softmax(logits)


def _ctc_log_probs(frames: list[str], sure: float = 8.0) -> np.ndarray:
    logits = np.zeros((len(frames), CODEC.num_classes), dtype=np.float32)
    for t, char in enumerate(frames):
        logits[t, CODEC.ids(char)[0] if char else 0] = sure
    return np.log(softmax(logits))


def test_rescoring_fills_a_gap_only_when_asked() -> None:
    covered = _ctc_log_probs(["c", "", "", "", "", "", "", "", "r", "", "", "d"])  # a box after the c
    probs = _decoder_probs("core")[None]
    plain = ctc_rescored(CODEC, probs, covered[None])[0]
    assert plain.text == "crd" and [g.slot for g in plain.gaps] == [1]
    filled = ctc_rescored(CODEC, probs, covered[None], fill_gaps=True)[0]
    assert filled.text == "cord" and len(filled.char_probs) == 4
    assert filled.gaps == [] and filled.char_frames[0] < filled.char_frames[1] < filled.char_frames[2]
    evenly = _ctc_log_probs(["c", "", "", "r", "", "", "d"])  # no gap: the reading stands
    assert ctc_rescored(CODEC, probs, evenly[None], fill_gaps=True)[0].text == "crd"


def test_the_fill_setting_travels_in_the_correction_settings() -> None:
    settings = CorrectionSettings.from_dict({"joint": {"fill_gaps": True, "fill_slack": 0}})
    assert settings.joint.fill_gaps and settings.joint.fill_slack == 0
    assert settings.to_dict()["joint"]["fill_gaps"] is True
    assert not CorrectionSettings().joint.fill_gaps
    for bad in ({"fill_gaps": "yes"}, {"fill_slack": -1}, {"fill_slack": 1.5}):
        with pytest.raises(SettingsError, match="joint.fill"):
            CorrectionSettings.from_dict({"joint": bad})


def test_the_cascade_sends_words_with_a_gap_to_the_decoders() -> None:
    from PIL import Image

    from runtime.ctc_reading import ctc_prediction
    from runtime.occlusion import border_colour, occlude
    from runtime.preprocess import preprocess
    from runtime.recognizer import Recognizer

    settings = CorrectionSettings.from_dict({"joint": {"fill_gaps": True}})
    readers = {mode: Recognizer.from_bundle(llm="none", decode=mode, threads=1, correction=settings)
               for mode in ("full", "ctc", "cascade")}
    images = []
    for path in sorted(SAMPLES.glob("*.png")):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        for left in (0.3, 0.45):  # a box over an inner character or two
            box = (int(width * left), 0, int(width * 0.18), height)
            images.append(occlude(image, [box], border_colour(image)))
    ctc = readers["ctc"].read(images)
    full = readers["full"].read(images)
    cascade = readers["cascade"].read(images)
    reader = readers["ctc"]
    predictions = [ctc_prediction(reader.codec, reader.backend.run("image_encoder", {
        "images": preprocess([im], reader.bundle.preprocessing)})["ctc_log_probs"][0], gap_rule=settings.gaps)
        for im in images]
    gapped = [i for i, p in enumerate(predictions) if p.gaps]
    assert gapped, "the probe set needs words whose CTC reading has a gap"
    for i in gapped:
        assert cascade[i].text == full[i].text, (ctc[i].text, full[i].text, cascade[i].text)

