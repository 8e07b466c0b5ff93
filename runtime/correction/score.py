"""A candidate's score as named terms combined by one weight vector (:class:`Weights`).

The terms (:class:`ScoreTerms`): ``visual`` (the tower's CTC log-likelihood of the
candidate less that of the word read, or the decoder's log-probability), counts of
characters inserted at a CTC gap (``gap``) and elsewhere (``insertion``), of inner symbols
replaced by a letter or digit (``symbol``), of CTC gaps left empty (``unfilled_gap``,
decoder scoring), the lexicon's frequency ``prior`` and the LLM's log-probability
(``llm``, when it was asked). :func:`combine` is the only place they meet.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from runtime.correction.contract import Candidate
from runtime.correction.gate import inner_symbols
from runtime.correction.settings import Weights
from runtime.decoding import CharCodec, ctc_log_likelihoods

#: The names of the terms, in the order of :meth:`ScoreTerms.vector`.
TERMS = ("visual", "gap", "insertion", "symbol", "prior", "unfilled_gap", "llm")


@dataclass
class ScoreTerms:
    """The named terms of one candidate's score (counts are numbers of characters)."""

    visual: float = 0.0
    gap: int = 0
    insertion: int = 0
    symbol: int = 0
    prior: float = 0.0
    unfilled_gap: int = 0
    #: the LLM's log-probability (None: not asked)
    llm: float | None = None

    def vector(self) -> np.ndarray:
        """The terms as a vector in :data:`TERMS` order (``llm`` 0 when not asked)."""
        return np.array([self.visual, self.gap, self.insertion, self.symbol, self.prior, self.unfilled_gap,
                         0.0 if self.llm is None else self.llm], dtype=np.float64)

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def weight_vector(weights: Weights) -> np.ndarray:
    """The weights in :data:`TERMS` order."""
    return np.array([weights.visual, weights.gap, weights.insertion, weights.symbol, weights.prior,
                     weights.unfilled_gap, weights.llm], dtype=np.float64)


def visual_part(terms: ScoreTerms, weights: Weights) -> float:
    """The visual evidence: the visual term and the credits for inserted characters and
    replaced symbols (what :attr:`Candidate.visual_logprob` reports)."""
    return (weights.visual * terms.visual + weights.gap * terms.gap + weights.insertion * terms.insertion
            + weights.symbol * terms.symbol)


def combine(terms: ScoreTerms, weights: Weights, with_llm: bool = True) -> float:
    """The score: ``weights`` . ``terms`` (without the LLM's term unless ``with_llm``)."""
    score = visual_part(terms, weights) + weights.prior * terms.prior + weights.unfilled_gap * terms.unfilled_gap
    if with_llm and terms.llm is not None:
        score += weights.llm * terms.llm
    return score


def rescore(candidate: Candidate, weights: Weights) -> None:
    """Set ``candidate``'s reported scores from its terms."""
    terms = candidate.terms
    candidate.visual_logprob = visual_part(terms, weights)
    candidate.prior = terms.prior
    candidate.llm_logprob = terms.llm
    candidate.score = combine(terms, weights)


@lru_cache(maxsize=8)
def codec_for(charset: str) -> CharCodec:
    """The token ids of ``charset`` (:class:`runtime.decoding.CharCodec`), built once per charset."""
    return CharCodec(charset)


def read_positions(length: int, inserted: Counter[int]) -> list[int]:
    """Where each of a read word's ``length`` characters sits in a candidate that inserts
    ``inserted[slot]`` characters before read position ``slot``."""
    out, shift = [], 0
    for i in range(length):
        shift += inserted.get(i, 0)
        out.append(i + shift)
    return out


def ctc_terms(read: str, ctc_log_probs: np.ndarray, candidates: list[Candidate], charset: str,
              gaps: dict[int, int], mask_symbols: bool) -> list[Candidate]:
    """``candidates`` whose terms the CTC outputs give: the visual term (log P_ctc(word) -
    log P_ctc(``read``)), characters inserted at a gap (``gaps``: slot -> characters it
    lost) and elsewhere, inner symbols replaced (``mask_symbols``); words the frames cannot
    hold (or outside ``charset``) are dropped."""
    codec = codec_for(charset)
    symbols = inner_symbols(read) if mask_symbols else ()
    kept = [c for c in candidates if set(c.text) <= codec.characters]
    if not kept:
        return []
    values = ctc_log_likelihoods(ctc_log_probs, [codec.ids(text) for text in [read, *(c.text for c in kept)]])
    out = []
    for c, value in zip(kept, values[1:], strict=True):
        if math.isfinite(value):
            per_slot = Counter(c.inserted)
            at_gaps = sum(min(n, gaps.get(slot, 0)) for slot, n in per_slot.items())
            shown = read_positions(len(read), per_slot)
            replaced = sum(c.text[shown[i]].isalnum() for i in symbols if shown[i] < len(c.text))
            c.terms = ScoreTerms(visual=float(value - values[0]), gap=at_gaps,
                                 insertion=len(c.text) - len(read) - at_gaps, symbol=replaced)
            out.append(c)
    return out
