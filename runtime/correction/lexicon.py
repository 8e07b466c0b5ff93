"""Word lists for the corrector: the shipped English list or a user's, and a pattern index.

A lexicon answers one question fast: which of its words have length ``n`` and given
characters at given positions (``c_ff__``)? Words are grouped by length; per length and
position each character owns a bitset of the group's words (numpy ``packbits``), so a
look-up ANDs one bitset per known position and reads the surviving indices: its cost
depends on the group size / 8 bytes per known position, never on a scan of the words.
Words are kept in the file's order (most frequent first for the shipped list), so matches
come out in that order too.

Matching folds case (the index holds lower-cased words); :attr:`Lexicon.words` keeps each
word as written, so a user's ``iPhone`` can be restored with its capitals.

File format (plain text or ``.gz``, UTF-8): one word per line, optionally
``word<TAB>zipf`` (log10 of the frequency per billion words, as ``wordfreq`` gives it);
blank lines and lines starting with ``#`` are ignored. A word without a frequency gets
``default_logprob``.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The shipped English list (built by ``python -m training.data.build_lexicon``).
DEFAULT_LEXICON = Path(__file__).resolve().parents[1] / "assets" / "lexicon" / "en_words.txt.gz"
#: Natural-log word probability of a word given without a frequency (a user's list): that of
#: the most frequent English words, so a user's words are never outweighed by the prior.
USER_LOGPROB = 0.0
_LN10 = math.log(10.0)


def zipf_to_logprob(zipf: float) -> float:
    """Natural-log probability of a word of Zipf frequency ``zipf`` (per-billion scale)."""
    return (float(zipf) - 9.0) * _LN10


@dataclass
class Matches:
    """Words of one length that fit a pattern, in lexicon order."""

    #: the words as written in the lexicon
    words: list[str]
    #: their lower-cased forms, as a (m, length) array of code points
    codes: np.ndarray
    #: natural-log word probabilities (the frequency prior)
    logprobs: np.ndarray

    def __len__(self) -> int:
        return len(self.words)


class _LengthGroup:
    """The words of one length and their (position, character) bitsets."""

    def __init__(self, words: list[str], folded: list[str], logprobs: list[float]) -> None:
        self.words = words
        self.logprobs = np.asarray(logprobs, dtype=np.float64)
        length = len(folded[0])
        self.codes = np.frombuffer("".join(folded).encode("utf-32-le"), dtype=np.uint32).reshape(-1, length)
        self.bits: list[dict[int, np.ndarray]] = []
        for position in range(length):
            column = self.codes[:, position]
            self.bits.append({int(c): np.packbits(column == c) for c in np.unique(column)})
        self.all = np.packbits(np.ones(len(words), dtype=bool))

    def match(self, fixed: Sequence[tuple[int, int]]) -> np.ndarray:
        """Indices (ascending) of the words with code ``c`` at position ``p`` for each ``(p, c)``."""
        acc = None
        for position, code in fixed:
            bits = self.bits[position].get(code)
            if bits is None:
                return np.zeros(0, dtype=np.int64)
            acc = bits.copy() if acc is None else np.bitwise_and(acc, bits, out=acc)
        if acc is None:
            acc = self.all
        return np.flatnonzero(np.unpackbits(acc, count=len(self.words)))


class Lexicon:
    """A word list with a (length, position, character) index. See the module docstring."""

    def __init__(self, words: Iterable[str], logprobs: Iterable[float] | None = None, name: str = "lexicon") -> None:
        self.name = name
        word_list = list(words)
        probs = [USER_LOGPROB] * len(word_list) if logprobs is None else [float(v) for v in logprobs]
        if len(probs) != len(word_list):
            raise ValueError(f"{len(probs)} frequencies for {len(word_list)} words")
        #: folded word -> (word as written, log-probability); the first occurrence wins
        self.entries: dict[str, tuple[str, float]] = {}
        for word, lp in zip(word_list, probs, strict=True):
            word = word.strip()
            if word and not any(c.isspace() for c in word) and word.lower() not in self.entries:
                if len(word.lower()) != len(word):
                    continue  # a character whose lower case has another length cannot be indexed
                self.entries[word.lower()] = (word, lp)
        self._by_length: dict[int, list[str]] = {}
        for folded in self.entries:
            self._by_length.setdefault(len(folded), []).append(folded)
        self._groups: dict[int, _LengthGroup] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.entries

    def logprob(self, word: str) -> float | None:
        """The word's frequency prior (natural log), or None when it is not in the list."""
        entry = self.entries.get(word.lower())
        return None if entry is None else entry[1]

    @classmethod
    def from_file(cls, path: str | os.PathLike, default_logprob: float = USER_LOGPROB) -> Lexicon:
        """Read a word list (see the module docstring); a bad file raises ``ValueError``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"lexicon file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        words, probs = [], []
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip() or line.startswith("#"):
                        continue
                    word, _, zipf = line.partition("\t")
                    try:
                        probs.append(zipf_to_logprob(float(zipf)) if zipf.strip() else default_logprob)
                    except ValueError:
                        raise ValueError(f"{path}:{number}: expected word<TAB>zipf, got {line!r}") from None
                    words.append(word)
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise ValueError(f"cannot read lexicon {path}: {exc}") from None
        if not words:
            raise ValueError(f"lexicon {path} has no words")
        return cls(words, probs, name=path.name)

    @classmethod
    def default(cls) -> Lexicon:
        """The shipped English list (read once per process)."""
        global _DEFAULT
        if _DEFAULT is None:
            _DEFAULT = cls.from_file(DEFAULT_LEXICON)
        return _DEFAULT

    def _group(self, length: int) -> _LengthGroup | None:
        group = self._groups.get(length)
        if group is None and length in self._by_length:
            folded = self._by_length[length]
            group = _LengthGroup([self.entries[f][0] for f in folded], folded, [self.entries[f][1] for f in folded])
            self._groups[length] = group
        return group

    def match(self, pattern: Sequence[str | None]) -> Matches:
        """The words with ``len(pattern)`` characters and ``pattern[i]`` (any case) wherever it
        is not None. The index is built for a length on its first look-up."""
        group = self._group(len(pattern))
        if group is None:
            return Matches([], np.zeros((0, len(pattern)), dtype=np.uint32), np.zeros(0))
        fixed = []
        for position, char in enumerate(pattern):
            if char is not None:
                folded = char.lower()
                if len(folded) != 1:
                    return Matches([], np.zeros((0, len(pattern)), dtype=np.uint32), np.zeros(0))
                fixed.append((position, ord(folded)))
        index = group.match(fixed)
        return Matches([group.words[i] for i in index], group.codes[index], group.logprobs[index])

    def scan(self, pattern: Sequence[str | None]) -> list[str]:
        """The same answer as :meth:`match` by reading every word (for tests only)."""
        out = []
        for folded, (word, _) in self.entries.items():
            if len(folded) == len(pattern) and all(
                c is None or c.lower() == f for c, f in zip(pattern, folded, strict=True)
            ):
                out.append(word)
        return out


_DEFAULT: Lexicon | None = None


def load_lexicons(spec: str | os.PathLike | None, use_default: bool = True) -> list[Lexicon]:
    """The lexicons for a ``--lexicon`` value: a user's file first (its words win), then the
    shipped English list unless ``use_default`` is False; ``"none"`` means no lexicon at all."""
    if spec is not None and str(spec).strip().lower() == "none":
        return []
    out = []
    if spec is not None and str(spec).strip().lower() not in ("", "default"):
        out.append(Lexicon.from_file(spec))
    if use_default:
        out.append(Lexicon.default())
    return out
