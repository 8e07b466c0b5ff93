"""The character language model and the gap fill: what the CTC reading skipped between two
letters is restored by spelling, every read character stays, and words are left alone when
the reading is likelier than any fill."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime.bundle import DEFAULT_BUNDLE
from runtime.charlm import CharLM
from runtime.correction.candidates import insertion_slots
from runtime.correction.lexicon import Lexicon
from runtime.correction.settings import CorrectionSettings, LMFill, SettingsError
from runtime.decoding import Gap, Prediction
from runtime.lm_fill import fill_all, fill_slots, filled
from runtime.recognizer import Recognizer

WORDS = [("rescue", 5.0), ("station", 5.0), ("cat", 6.0), ("hello", 5.5), ("coffee", 5.0), ("bakery", 4.5),
         ("stain", 4.0), ("rescued", 4.0), ("cart", 4.5), ("cast", 4.5)]


@pytest.fixture(scope="module")
def model() -> CharLM:
    return CharLM.from_lexicon(Lexicon([w for w, _ in WORDS], [(z - 9.0) * math.log(10) for _, z in WORDS]), order=4)


def _prediction(text: str, gaps: list[tuple[int, int]]) -> Prediction:
    return Prediction(text, [0.9] * len(text), [[(c, 0.9)] for c in text], [3.0 * i for i in range(len(text))],
                      [Gap(slot, missing, 2.0) for slot, missing in gaps])


def test_the_model_prefers_words_it_was_given(model: CharLM) -> None:
    assert model.logp("rescue") > model.logp("resue") > -math.inf
    assert model.logp("station") > model.logp("statoin")
    assert model.logp("RESCUE") == model.logp("rescue")  # case is folded
    assert model.logp("res-cue") == -math.inf and model.logp("") == -math.inf


def test_a_skipped_letter_is_restored_and_the_read_ones_kept(model: CharLM) -> None:
    out = filled(_prediction("Resue", [(3, 1)]), model, max_inserts=2, slack=1, insert_logprob=-1.0)
    assert out is not None and out.text == "Rescue"
    assert out.char_probs[:3] == [0.9] * 3 and out.char_probs[4:] == [0.9] * 2
    assert 0.0 < out.char_probs[3] < 1.0  # the inserted letter: its fill's share among the candidates
    assert out.gaps == [] and len(out.char_frames) == 6 and out.char_frames[2] < out.char_frames[3] < out.char_frames[4]
    upper = filled(_prediction("STATON", [(4, 1)]), model, max_inserts=2, slack=1, insert_logprob=-1.0)
    assert upper is not None and upper.text == "STATION"


def test_a_likely_reading_is_left_alone(model: CharLM) -> None:
    assert filled(_prediction("cat", [(1, 1)]), model, max_inserts=2, slack=1, insert_logprob=-1.0) is None
    # however likely a fill, a huge insertion cost keeps the reading
    assert filled(_prediction("Resue", [(3, 1)]), model, max_inserts=2, slack=1, insert_logprob=-100.0) is None


def test_only_gaps_between_two_letters_are_filled() -> None:
    assert fill_slots(_prediction("Resue", [(3, 1)]), slack=1) == {3: 2}
    assert fill_slots(_prediction("R2sue", [(2, 1)]), slack=1) == {}  # next to a digit
    assert fill_slots(_prediction("Re-sue", [(3, 1)]), slack=1) == {}  # a word with a symbol
    assert fill_slots(_prediction("Resue", [(0, 1), (5, 1)]), slack=0) == {}  # outer slots
    assert fill_slots(_prediction("ab", [(1, 1)]), slack=0, min_length=3) == {}
    assert insertion_slots(5, 2, {3: 2}) == [(3, 3)]
    assert insertion_slots(5, 2, {1: 1, 3: 1}) == [(1, 3)]


def test_fill_all_leaves_words_without_gaps_and_respects_the_switch(model: CharLM) -> None:
    words = [_prediction("Resue", [(3, 1)]), _prediction("Resue", [])]
    assert [p.text for p in fill_all(words, LMFill(), model)] == ["Rescue", "Resue"]
    assert [p.text for p in fill_all(words, LMFill(enabled=False), model)] == ["Resue", "Resue"]


def test_the_settings_are_checked_and_travel_in_the_correction_section() -> None:
    settings = CorrectionSettings.from_dict({"lm_fill": {"enabled": False, "insert_logprob": -2.5}})
    assert settings.lm_fill == LMFill(enabled=False, insert_logprob=-2.5)
    assert CorrectionSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(SettingsError, match="lm_fill.max_inserts"):
        CorrectionSettings.from_dict({"lm_fill": {"max_inserts": 0}})
    with pytest.raises(SettingsError, match="lm_fill.enabled"):
        CorrectionSettings.from_dict({"lm_fill": {"enabled": "yes"}})


def _covered(name: str, at: float) -> Image.Image:
    """A shipped sample word with a tenth of its width covered in its background colour."""
    with Image.open(DEFAULT_BUNDLE.parent / "samples" / f"{name}.png") as opened:
        image = opened.convert("RGB")
    width, height = image.size
    colour = tuple(int(v) for v in np.median(np.asarray(image)[:2].reshape(-1, 3), axis=0))
    x = int(width * at)
    ImageDraw.Draw(image).rectangle([x, 0, x + int(width * 0.09), height], fill=colour)
    return image


def test_without_a_corrector_full_and_cascade_restore_covered_letters_and_ctc_does_not() -> None:
    crops = [_covered("hello", 0.45), _covered("coffee", 0.55)]
    texts = {}
    for decode in ("ctc", "full", "cascade"):
        reader = Recognizer.from_bundle(llm="none", decode=decode, threads=1, precision="fp32", views="off")
        texts[decode] = [r.text for r in reader.read(crops, batch_size=1)]
        reader.close()
    assert texts["full"] == texts["cascade"] == ["hello", "Coffee"]
    assert all(len(c) < len(f) for c, f in zip(texts["ctc"], texts["full"], strict=True))  # CTC skipped them


def test_the_memo_stays_bounded(model: CharLM, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.charlm as charlm

    monkeypatch.setattr(charlm, "MEMO_LIMIT", 5)
    first = model.logp("rescued")
    assert len(model._memo) <= 5
    assert model.logp("rescued") == first  # the same probabilities after a reset


def test_a_word_with_a_gap_may_take_a_letter_at_its_weak_slots_too() -> None:
    rule = CorrectionSettings().gaps  # weak slots: at least 1.3 times the expected distance
    frames = [0.0, 4.8, 7.8, 13.8, 16.8, 19.8]  # R-s wide (weak), t-a wider (the gap)
    word = Prediction("Rstaon", [0.9] * 6, [], frames, [Gap(3, 1, 2.0)])
    assert fill_slots(word, slack=1, rule=rule) == {3: 2, 1: 1}
    assert fill_slots(word, slack=1) == {3: 2}
    assert fill_slots(replace(word, gaps=[]), slack=1, rule=rule) == {}  # no gap: no weak slots either
    no_weak = CorrectionSettings.from_dict({"gaps": {"weak_ratio": None}}).gaps
    assert fill_slots(word, slack=1, rule=no_weak) == {3: 2}
