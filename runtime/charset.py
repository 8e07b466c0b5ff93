"""Charsets, label normalisation and the evaluation protocol: the one implementation.

Training, evaluation, export checks and the runtime all call these functions, so a
label is cleaned and a prediction is scored the same way everywhere.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence

#: The 94-character training charset of CLIP4STR/PARSeq (case and punctuation).
CHARSET_94 = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation
#: The 36-character test charset: what the standard benchmarks score.
CHARSET_36 = string.digits + string.ascii_lowercase
#: Longest label kept, as in the papers.
MAX_LABEL_LENGTH = 25

_NAMED = {"94": CHARSET_94, "36": CHARSET_36}


def resolve_charset(charset: str) -> str:
    """Return the characters of ``charset``: a name ("94", "36") or the characters themselves."""
    chars = _NAMED.get(charset, charset)
    if len(set(chars)) != len(chars):
        raise ValueError("charset has repeated characters")
    return chars


def to_ascii(text: str) -> str:
    """NFKD-normalise and drop what does not survive as ASCII (accents, ligature marks)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


class CharsetAdapter:
    """Map a label onto a target charset.

    A charset without upper-case letters makes labels lower case, one without lower-case
    letters makes them upper case; characters still outside the charset are removed.
    """

    def __init__(self, charset: str) -> None:
        self.charset = resolve_charset(charset)
        self._allowed = frozenset(self.charset)
        self.lowercase_only = self.charset == self.charset.lower()
        self.uppercase_only = self.charset == self.charset.upper()

    def __call__(self, label: str) -> str:
        if self.lowercase_only:
            label = label.lower()
        elif self.uppercase_only:
            label = label.upper()
        return "".join(c for c in label if c in self._allowed)


def normalize_label(
    label: str,
    charset: str = CHARSET_94,
    max_length: int = MAX_LABEL_LENGTH,
    remove_whitespace: bool = True,
    unicode_to_ascii: bool = True,
) -> str | None:
    """Clean a ground-truth label for training; ``None`` when it cannot be used.

    Whitespace is removed, Unicode is reduced to ASCII (NFKD), the label is adapted to
    ``charset`` and dropped when it is empty or longer than ``max_length``.
    """
    if remove_whitespace:
        label = "".join(label.split())
    if unicode_to_ascii:
        label = to_ascii(label)
    label = CharsetAdapter(charset)(label)
    if not label or len(label) > max_length:
        return None
    return label


_EVAL = CharsetAdapter(CHARSET_36)


def eval_normalize(text: str) -> str:
    """The protocol's comparison form: lower case, reduced to ``[0-9a-z]``."""
    return _EVAL(to_ascii(text))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute at cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalized_edit_distance(prediction: str, label: str) -> float:
    """Edit distance divided by the longer length (0 for two empty strings)."""
    longest = max(len(prediction), len(label))
    return edit_distance(prediction, label) / longest if longest else 0.0


def keep_for_eval(label: str, max_length: int = MAX_LABEL_LENGTH) -> bool:
    """The protocol drops labels longer than ``max_length`` (after whitespace removal)."""
    return len("".join(label.split())) <= max_length


def word_correct(prediction: str, label: str) -> bool:
    """Whether ``prediction`` reads ``label`` under the evaluation protocol."""
    return eval_normalize(prediction) == eval_normalize(label)


class WordAccuracy:
    """Accumulates word accuracy and 1 - NED under the evaluation protocol."""

    def __init__(self) -> None:
        self.n = 0
        self.correct = 0
        self.ned_sum = 0.0

    def update(self, predictions: Iterable[str], labels: Iterable[str]) -> None:
        for prediction, label in zip(predictions, labels, strict=True):
            p, g = eval_normalize(prediction), eval_normalize(label)
            self.n += 1
            self.correct += p == g  # as word_correct
            self.ned_sum += 1.0 - normalized_edit_distance(p, g)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.n if self.n else 0.0

    @property
    def one_minus_ned(self) -> float:
        return 100.0 * self.ned_sum / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "accuracy": self.accuracy, "ned": self.one_minus_ned}


def weighted_total(results: Sequence[dict[str, float | int]]) -> dict[str, float | int]:
    """Sample-weighted total of per-set ``{"n", "accuracy", "ned"}`` results."""
    n = sum(int(r["n"]) for r in results)
    if not n:
        return {"n": 0, "accuracy": 0.0, "ned": 0.0}
    return {
        "n": n,
        "accuracy": sum(float(r["accuracy"]) * int(r["n"]) for r in results) / n,
        "ned": sum(float(r["ned"]) * int(r["n"]) for r in results) / n,
    }
