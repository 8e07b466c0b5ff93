"""Which words the corrector reviews, and why: the confidence gate plus the corrector's own
reasons (a CTC gap, a word in no lexicon). Run once per word, by the corrector."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.correction.contract import Reason
from runtime.correction.gate import GateDecision, core_span, gate, inner_symbols
from runtime.correction.lexicon import Lexicon
from runtime.correction.settings import CorrectionSettings, GapRule
from runtime.decoding import Prediction, expected_distances


@dataclass(frozen=True)
class Review:
    """The gate's verdict on one word, with the corrector's reasons."""

    #: the gate's decision (inner symbols masked too when characters may be inserted)
    decision: GateDecision
    #: positions below the threshold
    low_confidence: tuple[int, ...]
    #: slot -> most characters to insert there (from the CTC gaps)
    slots: dict[int, int]
    reasons: tuple[Reason, ...]

    @property
    def reviewed(self) -> bool:
        return bool(self.reasons)


def prior(text: str, lexicons: Sequence[Lexicon], oov_logprob: float) -> float:
    """The frequency prior of ``text`` without its leading and trailing symbols (the best
    over the lexicons). A word with symbols inside (``VICTORIA'S``, ``e-mail``) gets that
    of its rarest piece of two or more characters: the lexicons hold no symbols, and
    calling it unknown would let any known word replace it."""
    start, end = core_span(text)
    core = text[start:end]
    pieces = [core] if core.isalnum() else [p for p in re.split(r"[\W_]+", core) if len(p) > 1]
    if not pieces:
        return oov_logprob
    return min(word_prior(piece, lexicons, oov_logprob) for piece in pieces)


def word_prior(word: str, lexicons: Sequence[Lexicon], oov_logprob: float) -> float:
    """The best frequency prior of ``word`` over the lexicons (``oov_logprob`` when none has it)."""
    priors = [lp for lex in lexicons if (lp := lex.logprob(word)) is not None]
    return max(priors, default=oov_logprob)


def gap_slots(prediction: Prediction, settings: CorrectionSettings, inserts_characters: bool) -> dict[int, int]:
    """Slot -> most characters to insert there, from the prediction's CTC gaps (inner slots
    of its letters and digits; empty unless characters may be inserted). A word with one
    goes past the gate; only with ``insert_at="gaps"`` do they limit where."""
    if not inserts_characters:
        return {}
    s = settings
    inserts = s.candidates.inserts
    start, end = core_span(prediction.text)
    slack = s.candidates.gap_slack if s.mode == "rescore" else 0  # fill writes the estimated count
    slots: dict[int, int] = {}
    for g in sorted(prediction.gaps or (), key=lambda g: -g.strength):
        room = inserts - sum(slots.values())
        if start < g.slot < end and room > 0 and (s.mode == "rescore" or g.missing <= room):
            slots[g.slot] = min(room if s.mode == "rescore" else inserts, g.missing + slack)
    if slots and s.mode == "rescore":
        for slot in weak_slots(prediction, s.gaps):
            if start < slot < end and slot not in slots:
                slots[slot] = 1
    return slots


def weak_slots(prediction: Prediction, rule: GapRule) -> list[int]:
    """The slots between neighbouring characters at least ``rule.weak_ratio`` of their expected
    distance apart (one-character gaps, worth a look in a word that has a gap; none when
    ``weak_ratio`` is None or the word has no frames)."""
    frames = prediction.char_frames or []
    if rule.weak_ratio is None or len(frames) != len(prediction.text) or len(frames) < 2:
        return []
    distances, expected, _ = expected_distances(frames, prediction.text, rule.prior_pitch, rule.min_distances,
                                                rule.char_widths)
    return [j + 1 for j, (distance, normal) in enumerate(zip(distances, expected, strict=True))
            if normal > 0 and distance / normal >= rule.weak_ratio]


def unknown_word(text: str, lexicons: Sequence[Lexicon], settings: CorrectionSettings) -> bool:
    """A word the lexicons lack, worth looking for skipped characters: two or more letters
    and digits, at least one a letter, with a prior below ``gate.rare_logprob``."""
    start, end = core_span(text)
    core = text[start:end]
    if len(core) < 2 or not core.isalnum() or not any(c.isalpha() for c in core):
        return False
    return prior(core, lexicons, settings.candidates.oov_logprob) < settings.gate.rare_logprob


def review(prediction: Prediction, settings: CorrectionSettings, lexicons: Sequence[Lexicon],
           inserts_characters: bool) -> Review:
    """Gate ``prediction`` and say why it is reviewed (``inserts_characters``: whether the
    corrector may add characters, which makes gaps, inner symbols and unknown words count).
    Raises ``ValueError`` for a prediction without one probability per character."""
    decision = gate(prediction, settings.threshold)
    low = decision.masked
    if settings.gate.mask_inner_symbols and inserts_characters and any(c.isalpha() for c in prediction.text):
        decision = decision.with_masked(inner_symbols(prediction.text))
    slots = gap_slots(prediction, settings, inserts_characters)
    reasons: list[Reason] = []
    if low:
        reasons.append(Reason.LOW_CONFIDENCE)
    if len(decision.masked) > len(low):
        reasons.append(Reason.INNER_SYMBOL)
    if slots:
        reasons.append(Reason.GAP)
    if (not reasons and inserts_characters and settings.gate.review_unknown and lexicons
            and unknown_word(prediction.text, lexicons, settings)):
        reasons.append(Reason.UNKNOWN_WORD)
    return Review(decision, low, slots, tuple(reasons))
