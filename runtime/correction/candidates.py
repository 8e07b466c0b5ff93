"""Candidate generation of the rescore mode: the decoder's top-k and the lexicons.

Small pure functions, tested without llama.cpp: the characters allowed at a masked
position (:func:`position_options`), the top-k product (:func:`rescore_candidates`), where
inserted characters may go (:func:`insertion_layouts`), leading and trailing symbols
(:func:`split_affixes`), the lexicon's pool ranking (:func:`pool_scores`) and case
restoration (:func:`word_case`, :func:`restore_case`, :func:`spell`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.correction.contract import Candidate
from runtime.correction.gate import core_span
from runtime.correction.lexicon import Lexicon
from runtime.decoding import Prediction

__all__ = ["MIN_PROB", "Candidate", "fold", "insertion_layouts", "lexicon_candidates", "pool_scores",
           "position_options", "rescore_candidates", "restore_case", "spell", "split_affixes", "word_case"]

#: Smallest probability used in a log (a top-k entry of exactly 0 stays finite).
MIN_PROB = 1e-12


@dataclass
class _Option:
    """One character allowed at a masked position."""

    folded: str
    prob: float
    variants: dict[str, float] = field(default_factory=dict)


def fold(text: str, lower: bool) -> str:
    """The form the LLM sees: lower case when ``lower``, else unchanged."""
    return text.lower() if lower else text


def word_case(text: str, masked: tuple[int, ...]) -> str | None:
    """``"upper"`` or ``"lower"`` when every trusted letter has that case, else ``None``."""
    masked_set = set(masked)
    letters = [c for i, c in enumerate(text) if i not in masked_set and c.isalpha() and c.lower() != c.upper()]
    if not letters:
        return None
    if all(c.isupper() for c in letters):
        return "upper"
    if all(c.islower() for c in letters):
        return "lower"
    return None


def restore_case(
    char: str,
    position: int,
    pattern_case: str | None,
    variants: dict[str, float],
    charset: frozenset[str],
) -> str | None:
    """The character to write for ``char`` (any case) at a masked position.

    The word's case pattern wins (all trusted letters upper -> upper; all lower -> lower,
    except a masked first letter, which follows the decoder); otherwise the case the
    decoder found more probable (``variants``: character -> probability). The result is
    always in ``charset``; ``None`` when no case of ``char`` is.
    """
    options = [c for c in dict.fromkeys((char, char.lower(), char.upper())) if c in charset]
    if not options:
        return None
    if len(options) == 1:
        return options[0]
    preferred = None
    if pattern_case == "upper" or (pattern_case == "lower" and position > 0):
        preferred = char.upper() if pattern_case == "upper" else char.lower()
    elif variants:
        preferred = max(options, key=lambda c: variants.get(c, 0.0))
    if preferred in options:
        return preferred
    return options[0]


def position_options(
    prediction: Prediction,
    position: int,
    k: int,
    charset: frozenset[str],
    lower: bool,
) -> list[_Option]:
    """The characters allowed at a masked ``position``: the decoder's top-k, in the charset.

    With ``lower`` the case variants of a letter are merged (their probabilities summed).
    The decoder's chosen character is always among them. Best first.
    """
    pairs: list[tuple[str, float]] = []
    if position < len(prediction.topk):
        pairs = [(c, float(p)) for c, p in prediction.topk[position][:k]]
    chosen = prediction.text[position]
    if chosen not in {c for c, _ in pairs}:
        pairs.append((chosen, float(prediction.char_probs[position])))
    merged: dict[str, _Option] = {}
    for c, p in pairs:
        if c not in charset or not math.isfinite(p) or p < 0:
            continue
        key = fold(c, lower)
        option = merged.setdefault(key, _Option(key, 0.0))
        option.prob += p
        option.variants[c] = option.variants.get(c, 0.0) + p
    return sorted(merged.values(), key=lambda o: -o.prob)


def rescore_candidates(
    prediction: Prediction,
    masked: tuple[int, ...],
    charset: str,
    k: int = 5,
    max_candidates: int = 32,
    lower: bool = True,
) -> list[Candidate]:
    """The best ``max_candidates`` words from the top-k at the masked positions.

    The candidate set is the product over masked positions of each position's options,
    ranked by visual log-probability (sum of log p over all positions); a beam keeps the
    best ``max_candidates`` after each position, which is exact for a sum of independent
    terms. Trusted positions keep the decoder's character. The candidate texts are in
    ``charset`` (the decoder's case pattern applied); the vision answer is among them
    whenever its masked characters are in the charset.
    """
    if k < 1 or max_candidates < 1:
        raise ValueError("k and max_candidates must be at least 1")
    allowed = frozenset(charset)
    text = prediction.text
    base = sum(
        math.log(max(float(p), MIN_PROB)) for i, p in enumerate(prediction.char_probs) if i not in set(masked)
    )
    pattern_case = word_case(text, masked) if lower else None
    per_position: list[list[tuple[str, float]]] = []
    for position in masked:
        choices: dict[str, float] = {}
        for option in position_options(prediction, position, k, allowed, lower):
            char = option.folded
            if lower:
                char = restore_case(option.folded, position, pattern_case, option.variants, allowed)
            if char is not None and char not in choices:
                choices[char] = math.log(max(option.prob, MIN_PROB))
        if not choices:
            return []
        per_position.append(sorted(choices.items(), key=lambda kv: -kv[1]))
    beam: list[tuple[float, tuple[str, ...]]] = [(base, ())]
    for choices in per_position:
        expanded = ((score + lp, chars + (c,)) for score, chars in beam for c, lp in choices)
        beam = heapq.nlargest(max_candidates, expanded, key=lambda item: item[0])
    out = []
    for score, chars in beam:
        letters = list(text)
        for position, c in zip(masked, chars, strict=True):
            letters[position] = c
        word = "".join(letters)
        out.append(Candidate(word, fold(word, lower), score))
    return out


def insertion_slots(length: int, inserts: int, slots: Mapping[int, int] | None = None) -> list[tuple[int, ...]]:
    """The slots (sorted; one repeated for two characters in one gap) of each way to insert
    ``inserts`` inner characters into a word of ``length`` (a slot is the index they go
    before), at most ``slots[s]`` at ``s`` and only there when ``slots`` is given."""
    if length < 2:
        return []
    inner = range(1, length) if slots is None else sorted(s for s in slots if 0 < s < length)
    return [gaps for gaps in itertools.combinations_with_replacement(inner, inserts)
            if slots is None or all(gaps.count(s) <= slots[s] for s in set(gaps))]


def insertion_layouts(length: int, inserts: int, slots: Mapping[int, int] | None = None) -> list[tuple[int, ...]]:
    """Where ``inserts`` characters may go into a word of ``length``: each layout lists, per
    position of the longer word, the read position it shows or -1 for an inserted one.

    Inserted characters are inner (never first or last: a covered character between two
    visible ones is what the decoder skips); two may share a gap. ``slots`` (slot -> most
    characters there; a slot is the index they go before) limits them to those slots.
    """
    if inserts == 0:
        return [tuple(range(length))]
    out = []
    for gaps in insertion_slots(length, inserts, slots):
        layout: list[int] = []
        for i in range(length):
            layout.extend([-1] * gaps.count(i))
            layout.append(i)
        out.append(tuple(layout))
    return out


@dataclass(frozen=True)
class Affixes:
    """A word split into its leading symbols, core and trailing symbols (``"(Open)"``)."""

    head: str
    tail: str
    #: where the core starts in the word
    start: int
    #: the decoder's log-probability of the symbols, which stay as read
    logprob: float


def split_affixes(prediction: Prediction, masked: tuple[int, ...], slots: Mapping[int, int] | None
                  ) -> tuple[Prediction, tuple[int, ...], Mapping[int, int] | None, Affixes] | None:
    """The core of a word with leading or trailing symbols, its masked positions and slots
    shifted to it, and the symbols; None when the word has none."""
    start, end = core_span(prediction.text)
    if (start, end) == (0, len(prediction.text)):
        return None
    logprob = sum(math.log(max(float(p), MIN_PROB)) for i, p in enumerate(prediction.char_probs)
                  if not start <= i < end)
    core = Prediction(prediction.text[start:end], list(prediction.char_probs[start:end]),
                      list(prediction.topk[start:end]))
    inner = tuple(i - start for i in masked if start <= i < end)
    core_slots = None if slots is None else {i - start: n for i, n in slots.items() if start < i < end}
    return core, inner, core_slots, Affixes(prediction.text[:start], prediction.text[end:], start, logprob)


def with_affixes(found: list[Candidate], affixes: Affixes, lower: bool) -> list[Candidate]:
    """Core candidates with the symbols put back (and their log-probability added)."""
    head, tail = affixes.head, affixes.tail
    return [replace(c, text=head + c.text + tail, llm_text=fold(head + c.text + tail, lower),
                    visual_logprob=c.visual_logprob + affixes.logprob,
                    inserted=tuple(i + affixes.start for i in c.inserted)) for c in found]


def lexicon_candidates(
    prediction: Prediction,
    masked: tuple[int, ...],
    charset: str,
    lexicon: Lexicon,
    *,
    k: int,
    pool: int,
    prior_weight: float,
    lower: bool,
    inserts: int,
    insert_logprob: float,
    slots: Mapping[int, int] | None = None,
) -> list[Candidate]:
    """Words of ``lexicon`` with the prediction's trusted characters (any case), in order.

    Without ``inserts`` the words have the prediction's length; with ``inserts`` = n the
    words with 1..n more inner characters are looked up too (the decoder skipped covered
    characters: ``Resue`` -> ``Rescue``), each inserted character costing
    ``insert_logprob``; ``slots`` (slot -> most characters, e.g. from the CTC gaps) limits
    where they go. Leading and trailing symbols stay as read (:func:`split_affixes`). The
    best ``pool`` words by :func:`pool_scores` are returned, in that order, written by
    :func:`spell`; a word that would leave ``charset`` is skipped. The settings come from
    :class:`runtime.correction.settings.CandidateSettings` (no defaults here: one source).
    """
    split = split_affixes(prediction, masked, slots)
    if split is not None:
        core, inner, core_slots, affixes = split
        found = lexicon_candidates(core, inner, charset, lexicon, k=k, pool=pool, prior_weight=prior_weight,
                                   lower=lower, inserts=inserts, insert_logprob=insert_logprob,
                                   slots=core_slots) if core.text else []
        return with_affixes(found, affixes, lower)
    allowed = frozenset(charset)
    masked_set = set(masked)
    options = {position: {o.folded: o for o in position_options(prediction, position, k, allowed, True)}
               for position in masked}
    best = pool_scores(prediction, masked, lexicon, k=k, pool=pool, prior_weight=prior_weight,
                       inserts=inserts, insert_logprob=insert_logprob, slots=slots, options=options)
    pattern_case = word_case(prediction.text, masked) if lower else None
    out = []
    for _, visual, word, layout in sorted(best.values(), key=lambda item: -item[0])[: max(0, pool)]:
        candidate = spell(word, layout, prediction.text, masked_set, options, pattern_case, allowed)
        if candidate is None:
            continue
        slots_used = tuple(next(r for r in layout[j:] if r >= 0) for j, r in enumerate(layout) if r < 0)
        out.append(Candidate(candidate, fold(candidate, lower), visual, prior=lexicon.logprob(word) or 0.0,
                             source=lexicon.name, inserted=slots_used))
    return out


def pool_scores(prediction: Prediction, masked: tuple[int, ...], lexicon: Lexicon, *, k: int, pool: int,
                prior_weight: float, inserts: int, insert_logprob: float, slots: Mapping[int, int] | None,
                options: Mapping[int, Mapping[str, _Option]]) -> dict[str, tuple[float, float, str, tuple[int, ...]]]:
    """The lexicon's words for each layout (:func:`insertion_layouts`), ranked by visual
    log-probability (the decoder's top-k probability of its character at each masked
    position, case variants merged; a character outside the top-k gets the smaller of the
    k-th probability and the mass the top-k leaves; ``insert_logprob`` per inserted one) +
    ``prior_weight`` x the frequency prior; the best ``pool`` per layout, each word (folded)
    once with its best layout: folded word -> (rank score, visual, word, layout)."""
    text = prediction.text
    masked_set = set(masked)
    base = sum(math.log(max(float(p), MIN_PROB)) for i, p in enumerate(prediction.char_probs) if i not in masked_set)
    tables = {position: _position_table(prediction, position, k, list(options[position].values()))
              for position in masked}
    best: dict[str, tuple[float, float, str, tuple[int, ...]]] = {}
    for extra in range(inserts + 1):
        for layout in insertion_layouts(len(text), extra, slots):
            pattern = [None if r < 0 or r in masked_set else text[r] for r in layout]
            found = lexicon.match(pattern)
            if not len(found):
                continue
            scores = np.full(len(found), base + extra * insert_logprob, dtype=np.float64)
            for new_position, r in enumerate(layout):
                if r in masked_set:
                    lut, floor = tables[r]
                    column = found.codes[:, new_position]
                    scores += np.where(column < len(lut), lut[np.minimum(column, len(lut) - 1)], floor)
            ranked = scores + prior_weight * found.logprobs
            for index in np.argsort(-ranked, kind="stable")[: max(0, pool)]:
                word = found.words[int(index)]
                if word.lower() not in best or best[word.lower()][0] < ranked[index]:
                    best[word.lower()] = (float(ranked[index]), float(scores[index]), word, layout)
    return best


def spell(word: str, layout: tuple[int, ...], text: str, masked: set[int],
          options: Mapping[int, Mapping[str, _Option]], pattern_case: str | None,
          allowed: frozenset[str]) -> str | None:
    """How lexicon ``word`` is written over the read ``text`` (``layout``: per position the
    read position it shows, -1 for an inserted one): trusted characters as read, masked
    and inserted ones in the case of the word's trusted letters (:func:`restore_case`)
    unless the lexicon writes them in upper case (a user's ``iPhone``); None when a
    character has no case in the charset."""
    letters = []
    for new_position, r in enumerate(layout):
        if r >= 0 and r not in masked:
            letters.append(text[r])
            continue
        written = word[new_position]
        folded = written.lower()
        option = options.get(r, {}).get(folded) if r >= 0 else None
        if written != folded and written in allowed:  # the lexicon insists on upper case
            char: str | None = written
        else:
            char = restore_case(folded, max(new_position, 1) if r < 0 else r, pattern_case,
                                option.variants if option else {}, allowed)
        if char is None:
            return None
        letters.append(char)
    return "".join(letters)


def _position_table(
    prediction: Prediction, position: int, k: int, options: list[_Option]
) -> tuple[np.ndarray, float]:
    """Log-probability per lower-cased ASCII code at a masked position, and the floor for others."""
    top = prediction.topk[position][:k] if position < len(prediction.topk) else []
    probs = [float(p) for _, p in top if math.isfinite(float(p))]
    residual = max(0.0, 1.0 - sum(probs))
    floor = math.log(max(min(min(probs, default=MIN_PROB), residual), MIN_PROB))
    lut = np.full(128, floor, dtype=np.float64)
    for option in options:
        if len(option.folded) == 1 and ord(option.folded) < 128:
            lut[ord(option.folded)] = math.log(max(option.prob, MIN_PROB))
    return lut, floor
