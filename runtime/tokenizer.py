"""CLIP's byte-pair-encoding tokenizer without torch.

The text encoder of CLIP4STR reads the visual prediction as CLIP BPE ids. This module
gives the same ids as open_clip's tokenizer (checked on random charset strings in the
tests) from the same merges file, which the export step copies into every bundle.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import ftfy
import numpy as np
import regex

from runtime.charset import CharsetAdapter
from runtime.decoding import CharCodec

#: Tokens of CLIP's vocabulary that mark the start and the end of a text.
START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
#: Number of merges CLIP's vocabulary uses from the merges file.
NUM_MERGES = 49152 - 256 - 2
#: The context length CLIP4STR's text encoder uses.
CONTEXT_LENGTH = 16

_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def clean_text(text: str) -> str:
    """CLIP's text cleaning: fix mojibake, unescape HTML twice, squeeze whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class BPETokenizer:
    """Text -> CLIP BPE ids, read from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` merges file."""

    def __init__(self, merges_path: str | Path) -> None:
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        units = list(byte_to_unicode().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
        vocab += [START_TOKEN, END_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self._byte_map = byte_to_unicode()
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, NUM_MERGES))
            if pair not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without start and end tokens."""
        ids: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            cached = self._cache.get(word)
            if cached is None and word in (START_TOKEN, END_TOKEN):
                cached = [self.encoder[word]]
            if cached is None:
                mapped = "".join(self._byte_map[b] for b in word.encode("utf-8"))
                cached = [self.encoder[t] for t in self._bpe(mapped)]
                if len(self._cache) < 100_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def __call__(self, texts: list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """``(B, context_length)`` int64 ids: start, text, end, zero padding; truncated
        texts keep the end token in the last position, as open_clip does."""
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id][:context_length]
            ids[-1] = self.end_id
            out[row, : len(ids)] = ids
        return out


class TextBridge:
    """Visual prediction -> the text encoder's BPE ids (docs/DESIGN.md, step 3).

    The argmax ids are cut at the first EOS, mapped to text, adapted to the test charset
    (lower case, ``[0-9a-z]`` for the standard one) and BPE-tokenized to 16 ids.
    """

    def __init__(self, codec: CharCodec, test_charset: str, tokenizer: BPETokenizer,
                 context_length: int = CONTEXT_LENGTH) -> None:
        self.codec = codec
        self.adapter = CharsetAdapter(test_charset)
        self.tokenizer = tokenizer
        self.context_length = context_length

    def texts(self, argmax_ids: np.ndarray) -> list[str]:
        return [self.adapter(t) for t in self.codec.ids_to_text(argmax_ids)]

    def __call__(self, argmax_ids: np.ndarray) -> np.ndarray:
        return self.tokenizer(self.texts(argmax_ids), self.context_length)
