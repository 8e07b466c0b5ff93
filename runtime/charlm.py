"""A character language model of words: how word-like a string of letters and digits is.

An n-gram model over characters (Witten-Bell interpolation of orders 0 .. ``order - 1``
of context), counted from a word list with frequencies: each word counts the square root
of its frequency, so common words weigh more without ``the`` drowning the rest. At order 6
it nearly knows the list's words and still scores names and words it lacks by their
spelling. The decoding step uses it to fill the characters the CTC reading skipped
(:mod:`runtime.lm_fill`). Case is folded; only ``[0-9a-z]`` are modelled (a word with any
other character scores ``-inf``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.correction.lexicon import Lexicon

#: the characters the model knows (case folded)
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_START, _END = "^", "$"
_LN10 = math.log(10.0)
#: remembered character probabilities (context, character) before the memo starts afresh
MEMO_LIMIT = 1_000_000


class CharLM:
    """Character n-gram model; build with :meth:`from_counts` or :meth:`from_lexicon`."""

    def __init__(self, order: int, counts: list[dict[str, dict[str, float]]]) -> None:
        if order < 1 or len(counts) != order:
            raise ValueError(f"a model of order {order} needs {order} count tables, got {len(counts)}")
        self.order = order
        self._counts = counts
        #: context -> (total count, number of distinct next characters), per order
        self._totals = [{ctx: (sum(nxt.values()), len(nxt)) for ctx, nxt in table.items()} for table in counts]
        self._memo: dict[tuple[str, str], float] = {}

    @classmethod
    def from_counts(cls, words: Iterable[tuple[str, float]], order: int = 6) -> CharLM:
        """A model of ``(word, weight)`` pairs; words with characters outside
        :data:`ALPHABET` (after folding case) are left out."""
        grams: dict[str, float] = {}  # context + next character -> weight, every order
        allowed = set(ALPHABET)
        for word, weight in words:
            word = word.lower()
            if not word or not set(word) <= allowed or weight <= 0:
                continue
            padded = _START * (order - 1) + word + _END
            for i in range(order - 1, len(padded)):
                for k in range(order):
                    gram = padded[i - k:i + 1]
                    grams[gram] = grams.get(gram, 0.0) + weight
        counts: list[dict[str, dict[str, float]]] = [{} for _ in range(order)]
        for gram, weight in grams.items():
            counts[len(gram) - 1].setdefault(gram[:-1], {})[gram[-1]] = weight
        return cls(order, counts)

    @classmethod
    def from_lexicon(cls, lexicon: Lexicon, order: int = 6) -> CharLM:
        """A model of a :class:`runtime.correction.lexicon.Lexicon`: each word weighs the
        square root of its frequency per billion words (a user's words without one weigh
        as the most frequent English words)."""
        weights = ((folded, math.exp((lp + 9.0 * _LN10) / 2.0)) for folded, (_, lp) in lexicon.entries.items())
        return cls.from_counts(weights, order)

    def char_prob(self, context: str, char: str) -> float:
        """P(``char`` | the last ``order - 1`` characters of ``context``), ``$`` ending a word."""
        key = (context[len(context) - self.order + 1:] if self.order > 1 else "", char)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        context = key[0]
        prob = 1.0 / (len(ALPHABET) + 1)
        for k in range(self.order):
            ctx = context[len(context) - k:] if k else ""
            table = self._counts[k].get(ctx)
            if not table:
                break
            total, kinds = self._totals[k][ctx]
            share = total / (total + kinds)
            prob = share * table.get(char, 0.0) / total + (1.0 - share) * prob
        if len(self._memo) >= MEMO_LIMIT:  # a long-running server: keep the memory bounded
            self._memo.clear()
        self._memo[key] = prob
        return prob

    def logp(self, word: str) -> float:
        """Natural-log probability of ``word`` (case folded) as a whole word; ``-inf`` when it
        has a character outside :data:`ALPHABET` or is empty."""
        word = word.lower()
        if not word or not set(word) <= set(ALPHABET):
            return -math.inf
        padded = _START * (self.order - 1) + word + _END
        return sum(math.log(self.char_prob(padded[:i], padded[i])) for i in range(self.order - 1, len(padded)))
