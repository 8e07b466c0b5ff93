"""What the synthetic generator writes: real words, codes, numbers and punctuation.

Words are the top-N English words of the ``wordfreq`` package in lower, Title and UPPER
case; the rest are random alphanumeric codes, number patterns (prices, dates, times,
phone numbers, percentages) and random strings over the whole charset, so every
character of the charset appears. Only text that survives the charset unchanged (up to
case, for a single-case charset) is produced, so the image never shows a character that
the label lacks.
"""

from __future__ import annotations

import random
import string
from functools import lru_cache

from runtime.charset import MAX_LABEL_LENGTH, CharsetAdapter, resolve_charset

#: How often each kind of text is drawn (weights).
KINDS = {"word": 0.62, "word_punct": 0.08, "alnum": 0.12, "number": 0.1, "random": 0.08}
_WRAPS = ("{}.", "{},", "{}!", "{}?", "{}:", "({})", '"{}"', "'{}'", "#{}", "@{}", "{}'s", "-{}-", "{}*", "{}&")


@lru_cache(maxsize=4)
def english_words(top_n: int = 30000) -> tuple[str, ...]:
    """The ``top_n`` most frequent English words of wordfreq (lower case, ASCII only)."""
    from wordfreq import top_n_list

    return tuple(w for w in top_n_list("en", top_n) if w.isascii() and w.isprintable() and w.strip())


class WordSampler:
    """Draws label text for one charset from a ``random.Random``."""

    def __init__(self, charset: str = "94", max_length: int = MAX_LABEL_LENGTH, top_n: int = 30000) -> None:
        self.adapter = CharsetAdapter(charset)
        self.max_length = max_length
        printable = string.digits + string.ascii_letters + string.punctuation
        #: characters the generator may draw: those the charset keeps (up to case)
        self.allowed = "".join(c for c in printable if self.adapter(c))
        self.punct = "".join(c for c in string.punctuation if c in self.allowed) or ""
        self.words = tuple(w for w in english_words(top_n) if self.ok(w) and self.ok(w.upper()))
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] if (k != "word_punct" or self.punct) else 0.0 for k in self.kinds]
        resolve_charset(charset)

    def ok(self, text: str) -> bool:
        """True when ``text`` fits the charset and the length limit."""
        return 0 < len(text) <= self.max_length and len(self.adapter(text)) == len(text)

    def __call__(self, rng: random.Random) -> str:
        for _ in range(20):
            kind = rng.choices(self.kinds, self.weights)[0]
            text = getattr(self, f"_{kind}")(rng)
            if self.ok(text):
                return text
        return rng.choice(self.words) if self.words else rng.choice(self.allowed)

    def _case(self, word: str, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.5:
            return word
        return word[:1].upper() + word[1:] if r < 0.75 else word.upper()

    def _word(self, rng: random.Random) -> str:
        # frequent words more often, without drowning in "the": rank = N ** u, u skewed to 1
        rank = int(len(self.words) ** (rng.random() ** 0.5)) - 1
        return self._case(self.words[min(rank, len(self.words) - 1)], rng)

    def _word_punct(self, rng: random.Random) -> str:
        pattern = rng.choice(_WRAPS)
        if rng.random() < 0.2:
            return self._word(rng) + rng.choice("-/.&") + self._word(rng)
        return pattern.format(self._word(rng))

    def _alnum(self, rng: random.Random) -> str:
        pools = [string.ascii_uppercase + string.digits, string.ascii_lowercase + string.digits,
                 string.ascii_letters + string.digits, string.ascii_letters]
        pool = "".join(c for c in rng.choice(pools) if c in self.allowed) or self.allowed
        return "".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))

    def _number(self, rng: random.Random) -> str:
        d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
        patterns = [
            lambda: d(rng.randint(1, 6)),
            lambda: f"${rng.randint(0, 999)}.{d(2)}",
            lambda: f"{rng.randint(1, 31):02d}/{rng.randint(1, 12):02d}/{rng.randint(1950, 2030)}",
            lambda: f"{rng.randint(0, 23)}:{d(2)}",
            lambda: f"{d(3)}-{d(4)}",
            lambda: f"{rng.randint(1, 100)}%",
            lambda: f"No.{rng.randint(1, 999)}",
            lambda: f"{d(rng.randint(1, 3))},{d(3)}",
            lambda: f"+{d(2)} {d(3)}".replace(" ", ""),
            lambda: f"{rng.randint(1, 999)}{rng.choice(['km', 'kg', 'mm', 'ml', 'am', 'pm', 'th', 'st'])}",
        ]
        return rng.choice(patterns)()

    def _random(self, rng: random.Random) -> str:
        return "".join(rng.choice(self.allowed) for _ in range(rng.randint(1, 10)))
