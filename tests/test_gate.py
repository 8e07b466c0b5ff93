"""The confidence gate: which characters are trusted and which go to the LLM."""

from __future__ import annotations

import math

import pytest

from runtime.correction.gate import DEFAULT_THRESHOLD, gate
from runtime.decoding import Prediction


def test_default_threshold_is_the_papers() -> None:
    assert DEFAULT_THRESHOLD == 0.8


def test_confident_word_passes() -> None:
    decision = gate(Prediction("tea", [0.99, 0.8, 0.95]))
    assert not decision.needs_llm and decision.masked == () and decision.trusted == (0, 1, 2)


def test_positions_below_threshold_are_masked() -> None:
    decision = gate(Prediction("coffee", [0.9, 0.79, 0.99, 0.2, 0.8, 0.81]), 0.8)
    assert decision.needs_llm
    assert decision.masked == (1, 3)  # 0.8 itself is trusted (>= threshold)
    assert decision.trusted == (0, 2, 4, 5)
    assert decision.pattern() == "c_f_ee"
    assert decision.pattern("?") == "c?f?ee"


def test_threshold_changes_the_mask() -> None:
    probs = [0.95, 0.6, 0.99]
    assert gate(Prediction("abc", probs), 0.5).masked == ()
    assert gate(Prediction("abc", probs), 0.96).masked == (0, 1)
    assert gate(Prediction("abc", probs), 1.0).masked == (0, 1, 2)
    assert gate(Prediction("abc", probs), 0.0).masked == ()


def test_nan_probability_is_not_trusted() -> None:
    assert gate(Prediction("ab", [math.nan, 0.99])).masked == (0,)


def test_empty_word_never_goes_to_the_llm() -> None:
    assert not gate(Prediction("", [])).needs_llm


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan])
def test_bad_threshold_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        gate(Prediction("a", [0.5]), threshold)


def test_probabilities_must_match_the_text() -> None:
    with pytest.raises(ValueError, match="2 character probabilities for 3"):
        gate(Prediction("abc", [0.9, 0.9]))
