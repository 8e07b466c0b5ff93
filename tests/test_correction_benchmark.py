"""The correction benchmark's stores and counts (benchmarks/correction.py), without a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.correction import Word, cached_prediction, evaluate, insertion_slots, read_ctc, write_ctc
from runtime.correction.contract import Candidate
from runtime.decoding import Prediction


def test_ctc_outputs_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = {"/a/x.png": rng.normal(size=(28, 95)).astype(np.float32),
            "/b/y.png": rng.normal(size=(40, 95)).astype(np.float32)}
    assert read_ctc(tmp_path) == {}
    write_ctc(tmp_path, rows)
    back = read_ctc(tmp_path)
    assert list(back) == list(rows)
    for key, value in rows.items():
        assert back[key].shape == value.shape and back[key].dtype == np.float32
        np.testing.assert_allclose(back[key], value, rtol=1e-3, atol=1e-3)  # stored as float16
    entry = {"text": "Resue", "probs": [0.9] * 5, "topk": [[["R", 0.9]]] * 5, "frames": [0, 3, 6, 12, 15]}
    prediction = cached_prediction(entry, back["/a/x.png"])
    assert prediction.ctc_log_probs is back["/a/x.png"] and [g.slot for g in prediction.gaps] == [3]


def test_insertion_slots() -> None:
    assert insertion_slots("Resue", "Rescue") == {3}
    assert insertion_slots("Rsue", "Rescue") == {1, 2}
    assert insertion_slots("Rescue", "Rescue") == set()
    assert insertion_slots("escue", "Rescue") == set()  # first characters are never inserted


class ListCorrector:
    """Answers each word with a fixed text and candidate list."""

    def __init__(self, answers: dict[str, tuple[str, list[str]]]) -> None:
        self.answers = answers

    def correct_one(self, prediction: Prediction, charset: str):
        from runtime.llm import Correction

        text, candidates = self.answers[prediction.text]
        return Correction(text, prediction.text, text != prediction.text, True, "rescore",
                          candidates=[Candidate(c, c.lower(), 0.0) for c in candidates])


def test_evaluate_counts_fixed_broken_and_reachable() -> None:
    words = [Word("Rescue", Prediction("Resue", [1.0] * 5)), Word("house", Prediction("house", [1.0] * 5)),
             Word("Bank", Prediction("Bak", [1.0] * 3)), Word("zebra", Prediction("zbra", [1.0] * 4))]
    corrector = ListCorrector({"Resue": ("Rescue", ["Rescue", "Resue"]), "house": ("horse", ["horse", "house"]),
                               "Bak": ("Back", ["Back", "Bank"]), "zbra": ("zbra", ["zbra"])})
    got = evaluate(corrector, words, "94")
    assert (got["fixed"], got["broken"], got["changed"]) == (1, 1, 3)
    assert got["vision"] == pytest.approx(25.0) and got["accuracy"] == pytest.approx(25.0)
    assert got["reachable"] == pytest.approx(75.0)  # Rescue, house (read right), Bank; not zebra


def test_settings_that_break_clean_text_lose_the_tune(tmp_path: Path) -> None:
    from benchmarks.correction import REAL_VAL, VAL_SETS, _tune_key, set_paths

    assert "train_bd" in REAL_VAL and set(REAL_VAL) <= set(VAL_SETS)
    assert set_paths(tmp_path)["train_bd"] == tmp_path / "train_bd.tsv"

    def row(bd_gain: int, total: int) -> dict:
        gain = {"val_real": 1, "train_real": 100, "train_bd": bd_gain, "val_occ1": 300, "val_occ2": 150}
        return {"gain": gain, "total": total, "llm_calls": dict.fromkeys(VAL_SETS, 10)}

    # more words gained in all does not make up for breaking more born-digital words than fixing
    assert max([row(-3, 600), row(2, 580)], key=_tune_key)["total"] == 580
    assert max([row(1, 600), row(2, 580)], key=_tune_key)["total"] == 600
