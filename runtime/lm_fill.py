"""The decoding step's language side: fill the characters the CTC reading skipped.

Where the tower's CTC frames show a gap (:func:`runtime.decoding.find_gaps`: a covered or
unreadable stretch between two read characters), every way of inserting 1 ..
``max_inserts`` letters at the gaps between two letters is scored by a character language model
(:class:`runtime.charlm.CharLM`), each inserted character costing ``insert_logprob``; the
reading as it is competes too. Every character the tower read stays, and symbols are never
inserted. The settings (:class:`runtime.correction.settings.LMFill`) travel in the
bundle's manifest.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from functools import lru_cache

import numpy as np

from runtime.charlm import CharLM
from runtime.correction.candidates import insertion_slots, word_case
from runtime.correction.lexicon import Lexicon
from runtime.correction.review import weak_slots
from runtime.correction.settings import GapRule, LMFill
from runtime.decoding import Prediction, filled_frames

#: what may be inserted (between two letters)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def fill_slots(prediction: Prediction, slack: int, min_length: int = 2, rule: GapRule | None = None) -> dict[int, int]:
    """Slot -> most characters to insert there: the prediction's gaps between two letters of
    a word of letters and digits at least ``min_length`` long, each its estimated count plus
    ``slack``; with a gap ``rule``, also its weak slots (:func:`runtime.correction.review.weak_slots`,
    one character each) in a word that has a gap. No slot next to a digit: a language model
    cannot tell a covered digit."""
    text = prediction.text
    if len(text) < max(2, min_length) or not text.isalnum() or not text.isascii():
        return {}
    slots = {g.slot: g.missing + slack for g in prediction.gaps}
    if slots and rule is not None:
        for slot in weak_slots(prediction, rule):
            slots.setdefault(slot, 1)
    return {slot: n for slot, n in slots.items()
            if 0 < slot < len(text) and text[slot - 1].isalpha() and text[slot].isalpha()}


def inserted(text: str, combo: tuple[int, ...], chars: tuple[str, ...]) -> str:
    """``text`` with ``chars[i]`` inserted before position ``combo[i]`` (``combo`` sorted)."""
    out, at = [], 0
    for slot, char in zip(combo, chars, strict=True):
        out.append(text[at:slot])
        out.append(char)
        at = slot
    out.append(text[at:])
    return "".join(out)


def scored_fills(text: str, slots: dict[int, int], model: CharLM, max_inserts: int,
                 insert_logprob: float) -> list[tuple[float, str, tuple[int, ...]]]:
    """(score, lower-cased word, slots used) of the reading (first, no slots) and of every way
    to insert 1 .. ``max_inserts`` letters at ``slots``."""
    lower = text.lower()
    scored: list[tuple[float, str, tuple[int, ...]]] = [(model.logp(lower), lower, ())]
    for count in range(1, max_inserts + 1):
        for combo in insertion_slots(len(text), count, slots):
            for chars in itertools.product(LETTERS, repeat=count):
                word = inserted(lower, combo, chars)
                scored.append((model.logp(word) + count * insert_logprob, word, combo))
    return scored


def best_fill(text: str, slots: dict[int, int], model: CharLM, max_inserts: int,
              insert_logprob: float) -> tuple[str, tuple[int, ...], float] | None:
    """The best filled word of ``text`` (lower-cased letters inserted), the slots it used and
    its share of the probability among the candidates (the reading included); None when the
    reading as it is scores best."""
    scored = scored_fills(text, slots, model, max_inserts, insert_logprob)
    scores = np.array([s for s, _, _ in scored])
    if not np.isfinite(scores).any():
        return None
    best = int(np.argmax(scores))
    if best == 0:
        return None
    share = float(np.exp(scores[best] - np.logaddexp.reduce(scores)))
    return scored[best][1], scored[best][2], share


def top_fills(text: str, slots: dict[int, int], model: CharLM, max_inserts: int, insert_logprob: float,
              count: int) -> list[tuple[str, tuple[int, ...]]]:
    """The ``count`` best filled words of ``text`` (as :func:`cased` writes them, whether or not
    the reading scores better) and the slots each used, best first."""
    scored = [item for item in scored_fills(text, slots, model, max_inserts, insert_logprob)[1:]
              if np.isfinite(item[0])]
    scored.sort(key=lambda item: -item[0])
    return [(cased(word, combo, text), combo) for _, word, combo in scored[:count]]


def cased(word: str, combo: tuple[int, ...], text: str) -> str:
    """``word`` (``text`` with lower-case characters inserted at ``combo``) with ``text``'s own
    characters as read, the inserted ones upper case when ``text`` has no lower-case letter."""
    upper = word_case(text, ()) == "upper"
    marks = {slot + k for k, slot in enumerate(combo)}  # positions of the inserted characters
    out, read = [], iter(text)
    for i, char in enumerate(word):
        out.append((char.upper() if upper else char) if i in marks else next(read))
    return "".join(out)


def filled(prediction: Prediction, model: CharLM, *, max_inserts: int, slack: int,
           insert_logprob: float, min_length: int = 2, rule: GapRule | None = None) -> Prediction | None:
    """``prediction`` with its gaps filled (each inserted character's probability: the filled
    word's share among the candidates), or None when it has no gap or the reading wins."""
    slots = fill_slots(prediction, slack, min_length, rule)
    if not slots:
        return None
    found = best_fill(prediction.text, slots, model, max_inserts, insert_logprob)
    if found is None:
        return None
    word, combo, share = found
    text = cased(word, combo, prediction.text)
    marks = {slot + k for k, slot in enumerate(combo)}
    probs, topk, read = [], [], iter(range(len(prediction.text)))
    for i, char in enumerate(text):
        if i in marks:
            probs.append(share)
            topk.append([(char, share)])
        else:
            j = next(read)
            probs.append(float(prediction.char_probs[j]))
            topk.append(list(prediction.topk[j]) if j < len(prediction.topk) else [(char, probs[-1])])
    frames = filled_frames(prediction.char_frames, list(prediction.text), list(text))
    return replace(prediction, text=text, char_probs=probs, topk=topk, char_frames=frames, gaps=[])


@lru_cache(maxsize=2)
def word_model(order: int) -> CharLM:
    """The character model of the shipped English word list (built once per process and
    order, on first use: about 2 s)."""
    return CharLM.from_lexicon(Lexicon.default(), order)


def fill_all(predictions: list[Prediction], settings: LMFill, model: CharLM | None = None,
             rule: GapRule | None = None) -> list[Prediction]:
    """:func:`filled` for each prediction that has gaps (the others as they are); ``model``
    defaults to :func:`word_model` of ``settings.order``, built only when a word has a gap;
    ``rule``: the gap rule whose weak slots count too (``settings.weak_slots``)."""
    if not settings.enabled:
        return predictions
    out = []
    for p in predictions:
        new = None
        if p.gaps:
            model = model or word_model(settings.order)
            new = filled(p, model, max_inserts=settings.max_inserts, slack=settings.slack,
                         insert_logprob=settings.insert_logprob, min_length=settings.min_length,
                         rule=rule if settings.weak_slots else None)
        out.append(p if new is None else new)
    return out
