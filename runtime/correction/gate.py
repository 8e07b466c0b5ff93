"""The confidence gate (docs/DESIGN.md section 7): which characters of a prediction to trust.

A character's confidence is the softmax probability of the chosen character
(``Prediction.char_probs``). Characters at or above the threshold are trusted; those below
it are masked and a word with any masked character goes to the LLM corrector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.correction.settings import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from runtime.decoding import Prediction

__all__ = ["DEFAULT_THRESHOLD", "MASK_CHAR", "GateDecision", "check_threshold", "core_span", "gate",
           "inner_symbols"]
#: How a masked character is shown in a pattern (logs, prompts, cache keys).
MASK_CHAR = "_"


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one word: which positions are masked (below the threshold)."""

    text: str
    masked: tuple[int, ...]
    threshold: float

    @property
    def needs_llm(self) -> bool:
        """True when some character is below the threshold."""
        return bool(self.masked)

    @property
    def trusted(self) -> tuple[int, ...]:
        """Positions at or above the threshold."""
        masked = set(self.masked)
        return tuple(i for i in range(len(self.text)) if i not in masked)

    def with_masked(self, extra: tuple[int, ...]) -> GateDecision:
        """The same decision with ``extra`` positions masked too."""
        return GateDecision(self.text, tuple(sorted(set(self.masked) | set(extra))), self.threshold)

    def pattern(self, mask_char: str = MASK_CHAR) -> str:
        """The text with masked positions replaced by ``mask_char`` (e.g. ``Res_ue``)."""
        masked = set(self.masked)
        return "".join(mask_char if i in masked else c for i, c in enumerate(self.text))


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float, refusing values outside [0, 1]."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the gate threshold must be within [0, 1], got {threshold!r}")
    return value


def gate(prediction: Prediction, threshold: float = DEFAULT_THRESHOLD) -> GateDecision:
    """Mask the characters of ``prediction`` whose probability is below ``threshold``.

    Raises ``ValueError`` when the prediction has not one probability per character.
    """
    threshold = check_threshold(threshold)
    if len(prediction.char_probs) != len(prediction.text):
        raise ValueError(
            f"prediction {prediction.text!r} has {len(prediction.char_probs)} character "
            f"probabilities for {len(prediction.text)} characters"
        )
    masked = tuple(i for i, p in enumerate(prediction.char_probs) if not float(p) >= threshold)
    return GateDecision(prediction.text, masked, threshold)


def core_span(text: str) -> tuple[int, int]:
    """``(start, end)`` of ``text`` without its leading and trailing non-alphanumeric characters."""
    start, end = 0, len(text)
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return start, end


def inner_symbols(text: str) -> tuple[int, ...]:
    """Positions of non-alphanumeric characters between a word's letters and digits (``dr_ss``:
    a decoder often writes a symbol where a character is covered)."""
    start, end = core_span(text)
    return tuple(i for i in range(start, end) if not text[i].isalnum())
