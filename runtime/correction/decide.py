"""The keep-or-replace rule: when the best candidate replaces the word read."""

from __future__ import annotations

from enum import StrEnum

from runtime.correction.contract import Candidate
from runtime.correction.score import combine
from runtime.correction.settings import Margins, Weights


class Verdict(StrEnum):
    """What :func:`keep_or_replace` decided, and by which margin."""

    REPLACE = "replace"
    #: within ``margins.keep`` of the word read
    KEEP = "keep"
    #: a short word changed without adding characters: within ``margins.short``
    KEEP_SHORT = "keep_short"
    #: neither word in a lexicon: within ``margins.unknown``
    KEEP_UNKNOWN = "keep_unknown"


def keep_or_replace(top: Candidate, read: Candidate, margins: Margins, weights: Weights,
                    unknown: bool) -> Verdict:
    """Whether ``top`` replaces ``read``: it must score more than the margin above it,
    compared on the terms both have (the LLM's only if it scored both). The margin is
    ``margins.short`` for a same-length word of at most ``margins.short_length``
    characters, else ``margins.keep``, and at least ``margins.unknown`` when neither word is
    in a lexicon (``unknown``: a small LLM's preference between two unknown words is close
    to a coin flip)."""
    if top is read:
        return Verdict.KEEP
    both = read.terms.llm is not None and top.terms.llm is not None
    short = len(top.text) == len(read.text) <= margins.short_length
    base = margins.short if short else margins.keep
    margin = max(base, margins.unknown if unknown else 0.0)
    if combine(top.terms, weights, both) - combine(read.terms, weights, both) > margin:
        return Verdict.REPLACE
    if unknown and margins.unknown > base:
        return Verdict.KEEP_UNKNOWN
    return Verdict.KEEP_SHORT if short else Verdict.KEEP
