"""The contract between the recognizer and a corrector: :class:`Corrector` and :class:`Correction`.

The recognizer hands a corrector every decoded word (:meth:`Corrector.correct`); the
corrector owns the gate and says, as values, why it reviewed a word
(:attr:`Correction.reasons`) and why it did not use its model (:attr:`Correction.skipped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from runtime.decoding import Prediction


class Reason(StrEnum):
    """Why a word was reviewed (went past the gate)."""

    #: some character below the threshold
    LOW_CONFIDENCE = "low_confidence"
    #: a symbol inside the word (``dr_ss``: a decoder often writes one for a covered character)
    INNER_SYMBOL = "inner_symbol"
    #: the CTC frames show a gap where characters are probably missing
    GAP = "gap"
    #: every character is confident but the word is in no lexicon
    UNKNOWN_WORD = "unknown_word"


class Skip(StrEnum):
    """Why the model was not used for a word (decisions, not failures)."""

    #: the word did not go past the gate
    NOT_REVIEWED = "not_reviewed"
    #: no model is loaded (:attr:`Correction.warnings` says why when one was asked for)
    NO_MODEL = "no_model"
    #: too many characters below the threshold: the vision answer is kept
    TOO_MANY_MASKED = "too_many_masked"
    #: the cheap ranking's best led the next by more than the LLM margin
    CLEAR_LEAD = "clear_lead"
    #: the model's answer came from the cache
    CACHED = "cached"

    @property
    def message(self) -> str | None:
        """The sentence :attr:`Correction.decision` shows (None: nothing worth saying)."""
        if self is Skip.TOO_MANY_MASKED:
            return "too many characters below the threshold; vision answer kept"
        return None


@dataclass
class Candidate:
    """One word the rescorer considers, with its scores (``None`` until scored)."""

    text: str
    #: the string the LLM scores (``text`` lower-cased when the corrector folds case)
    llm_text: str
    visual_logprob: float
    llm_logprob: float | None = None
    score: float | None = None
    #: frequency prior (natural log; 0 when no lexicon is used)
    prior: float = 0.0
    #: where it came from: "topk" (the decoder's alternatives), "vision" or a lexicon's name
    source: str = "topk"
    #: the slot (index in the read word) of each character it inserts
    inserted: tuple[int, ...] = ()
    #: the named terms its score combines (:class:`runtime.correction.score.ScoreTerms`)
    terms: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "text": self.text,
            "llm_text": self.llm_text,
            "visual_logprob": self.visual_logprob,
            "llm_logprob": self.llm_logprob,
            "prior": self.prior,
            "score": self.score,
            "source": self.source,
            "inserted": list(self.inserted),
        }
        if self.terms is not None:
            out["terms"] = self.terms.to_dict()
        return out


@dataclass
class Correction:
    """The corrector's answer for one word."""

    #: the final text: the vision answer unless the correction changed it
    text: str
    #: the decoder's text
    vision_text: str
    #: whether the final text differs from the vision answer
    changed: bool
    #: whether the word went past the gate (:attr:`reasons` says why)
    gated: bool
    #: "rescore", "fill", "lexicon" (rescore candidates ranked without a language model) or
    #: "none" (no correction configured)
    mode: str
    #: positions the correction may change: below the threshold, plus inner symbols
    masked: list[int] = field(default_factory=list)
    #: what the LLM weighed: rescore candidates best first, or the fill answer
    candidates: list[Candidate] = field(default_factory=list)
    #: whether the LLM result came from the cache
    cached: bool = False
    #: whether the word went past the gate only for being in no lexicon
    unknown_word: bool = False
    #: slots where characters may be inserted (the prediction's CTC gaps that were used)
    gaps: list[int] = field(default_factory=list)
    #: whether the LLM was asked (rescore skips it when the cheap ranking is clear)
    llm_called: bool = False
    #: seconds spent on this word by the corrector
    time_s: float = 0.0
    #: positions below the threshold (the gate's own verdict, without inner symbols)
    low_confidence: list[int] = field(default_factory=list)
    #: why the word was reviewed (empty: it was not)
    reasons: list[Reason] = field(default_factory=list)
    #: why the model was not used (None: it was, or it failed: see :attr:`warnings`)
    skipped: Skip | None = None
    #: failures (model unavailable, timeout, answer rejected): the vision answer stands
    warnings: list[str] = field(default_factory=list)

    @property
    def inserted(self) -> int:
        """Characters the correction added (rescore with inserts; 0 otherwise)."""
        return max(0, len(self.text) - len(self.vision_text))

    @property
    def decision(self) -> str | None:
        """Why the vision answer was kept without asking the model, when that was a decision
        worth reporting (not a failure): e.g. too many characters below the threshold."""
        return self.skipped.message if self.skipped is not None else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidates"] = [c.to_dict() for c in self.candidates]
        data["reasons"] = [r.value for r in self.reasons]
        data["skipped"] = None if self.skipped is None else self.skipped.value
        data["decision"] = self.decision
        return data


@runtime_checkable
class Corrector(Protocol):
    """What the recognizer needs from a corrector."""

    #: "rescore" or "fill"
    mode: str

    def correct(self, predictions: Sequence[Prediction], charset: str) -> list[Correction]:
        """One :class:`Correction` per prediction, in order (every word: the corrector gates
        them itself; a word it does not review comes back with ``gated`` false)."""
        ...
