"""The fill mode: the LLM writes the word under a GBNF grammar that fixes the trusted
characters (and leaves one slot per character to be written into a CTC gap)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runtime.correction.candidates import MIN_PROB, fold, position_options, restore_case, word_case
from runtime.correction.contract import Candidate, Correction
from runtime.correction.gate import MASK_CHAR, GateDecision
from runtime.correction.settings import FILL_TEMPLATE, CorrectionSettings

if TYPE_CHECKING:
    from runtime.correction.backend import LLMBackend
    from runtime.correction.cache import LRU
    from runtime.decoding import Prediction


class Rejected(Exception):
    """The LLM answer broke an invariant; the vision answer stands."""


def fill_prompt(pattern: str, template: str = FILL_TEMPLATE, mask_char: str = MASK_CHAR) -> str:
    """The fill prompt for a masked ``pattern`` (masked positions shown as ``mask_char``)."""
    return template.format(pattern=pattern, mask=mask_char)


def _gbnf_char(c: str) -> str:
    """One character escaped for a GBNF literal or character class."""
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def fill_grammar(slots: Sequence[str | frozenset[str]], leading_space: bool = True) -> str:
    """A GBNF grammar for exactly one word: fixed characters and one-character slots.

    ``slots`` has one entry per position: the trusted character (a one-character string),
    or the set of characters allowed at a masked position. The word has the same length as
    the pattern (no insertions or deletions). With ``leading_space`` the word may start with
    one space (the prompt ends without one, so the model writes words as it saw them in
    training, " coffee"); :func:`fill_answer` removes it.
    """
    if not slots:
        raise ValueError("cannot build a grammar for an empty word")
    items: list[str] = []
    classes: dict[str, str] = {}
    for slot in slots:
        if isinstance(slot, str):
            if len(slot) != 1:
                raise ValueError(f"a fixed slot holds one character, got {slot!r}")
            items.append(f'"{_gbnf_char(slot)}"')
            continue
        if not slot:
            raise ValueError("no character is allowed at a masked position")
        body = "".join(_gbnf_char(c) for c in sorted(slot))
        name = classes.setdefault(body, f"m{len(classes)}")
        items.append(name)
    lines = ["root ::= " + ('" "? ' if leading_space else "") + " ".join(items)]
    lines += [f"{name} ::= [{body}]" for body, name in classes.items()]
    return "\n".join(lines) + "\n"


def fill_answer(text: str) -> str:
    """The word of a fill completion: without the optional leading space of the grammar."""
    return text[1:] if text.startswith(" ") else text


def fill_slot(prediction: Prediction, position: int, charset: str, settings: CorrectionSettings) -> frozenset[str]:
    """Characters the fill mode may write at a masked position (in the LLM's case).

    ``fill.slots``: ``"alnum"`` (default) the letters and digits of the charset plus
    whatever else the decoder's top-k proposes there, so punctuation appears only where
    the image suggests it; ``"charset"`` the whole charset; ``"topk"`` only the decoder's
    top-k. Never the mask character.
    """
    k, lower = settings.candidates.k, settings.candidates.lowercase
    proposed = {c for c, _ in prediction.topk[position][:k]} if position < len(prediction.topk) else set()
    proposed.add(prediction.text[position])
    if settings.fill.slots == "charset":
        allowed = set(charset)
    elif settings.fill.slots == "alnum":
        allowed = {c for c in charset if c.isalnum()} | proposed
    else:
        allowed = proposed
    return frozenset(fold(c, lower) for c in allowed if c in charset and c != MASK_CHAR)


def fill_word(backend: LLMBackend, cache: LRU, settings: CorrectionSettings, prediction: Prediction,
              decision: GateDecision, charset: str, deadline: float | None, result: Correction,
              gaps: dict[int, int] | None = None) -> None:
    """Ask the model to write the word (``gaps``: slot -> characters to write there); the
    answer goes into ``result``; :class:`Rejected` when it breaks the grammar or the charset."""
    lower = settings.candidates.lowercase
    template = settings.fill.template
    allowed_set = frozenset(charset)
    text = prediction.text
    masked = set(decision.masked)
    # per position of the answer: the read position it shows, or -1 for a character
    # written into a CTC gap (``gaps``: slot -> how many)
    layout = [r for i in range(len(text)) for r in [-1] * (gaps or {}).get(i, 0) + [i]]
    letters_only = frozenset(fold(c, lower) for c in charset if c.isalpha())
    slots: list[str | frozenset[str]] = [
        letters_only if r < 0 else fill_slot(prediction, r, charset, settings) if r in masked
        else fold(text[r], lower) for r in layout]
    grammar = fill_grammar(slots, leading_space=not template.endswith(" "))
    pattern = "".join(MASK_CHAR if isinstance(slot, frozenset) else slot for slot in slots)
    prompt = fill_prompt(pattern, template)
    key = ("fill", prompt, grammar)
    answer = cache.get(key)
    result.cached = answer is not None
    if answer is None:
        answer = backend.fill(prompt, grammar, max_tokens=len(layout) + 2, deadline=deadline)
        if not isinstance(answer, str):
            raise Rejected(f"backend returned {type(answer).__name__}, not text")
        answer = fill_answer(answer)
        if deadline is None or time.monotonic() <= deadline:
            cache.put(key, answer)
        result.llm_called = True
    if not isinstance(answer, str) or len(answer) != len(layout):
        raise Rejected(f"fill answer {answer!r} has not {len(layout)} characters")
    pattern_case = word_case(text, decision.masked) if lower else None
    letters = []
    visual = 0.0
    for j, r in enumerate(layout):
        if r >= 0 and r not in masked:
            if answer[j] != slots[j]:
                raise Rejected(f"fill answer {answer!r} changes trusted position {r}")
            visual += math.log(max(float(prediction.char_probs[r]), MIN_PROB))
            letters.append(text[r])
            continue
        if answer[j] not in slots[j]:
            raise Rejected(f"fill answer {answer!r} has {answer[j]!r} outside the grammar")
        found = position_options(prediction, r, len(charset), allowed_set, lower) if r >= 0 else []
        option = next((o for o in found if o.folded == answer[j]), None)
        char: str | None = answer[j]
        if lower:
            char = restore_case(answer[j], max(j, 1) if r < 0 else r, pattern_case,
                                option.variants if option else {}, allowed_set)
        if char is None or char not in allowed_set:
            raise Rejected(f"fill answer {answer!r} has {answer[j]!r} outside the charset")
        letters.append(char)
        visual += settings.candidates.insert_logprob if r < 0 else math.log(max(option.prob if option else 0.0,
                                                                                 MIN_PROB))
    result.text = "".join(letters)
    result.candidates = [Candidate(result.text, answer, visual)]
