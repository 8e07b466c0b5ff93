"""Character token ids and decoding of logits: the one implementation.

Token ids (DESIGN.md): EOS = 0, characters 1..C, BOS = C + 1, PAD = C + 2. The
classifier head predicts C + 1 classes (EOS and the characters), never BOS or PAD.
Everything here is numpy; training converts tensors with ``.numpy()`` and calls it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.charset import resolve_charset


@dataclass
class Prediction:
    """One decoded word: text, per-character probabilities and top-k alternatives."""

    text: str
    char_probs: list[float]
    #: per position (same length as ``text``): list of (character, probability), best first
    topk: list[list[tuple[str, float]]] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """Word confidence: the product of the character probabilities (1 when empty)."""
        return float(np.prod(self.char_probs)) if self.char_probs else 1.0


class CharCodec:
    """Encodes labels to token ids and decodes head outputs back to text."""

    eos_id = 0

    def __init__(self, charset: str) -> None:
        self.charset = resolve_charset(charset)
        self.bos_id = len(self.charset) + 1
        self.pad_id = len(self.charset) + 2
        self.num_classes = len(self.charset) + 1  # head outputs: EOS + characters
        self.num_tokens = len(self.charset) + 3  # embedding rows: + BOS and PAD
        self._index = {c: i + 1 for i, c in enumerate(self.charset)}
        self._chars = np.array(["\0", *self.charset])

    def encode(self, labels: list[str], length: int | None = None) -> np.ndarray:
        """``[BOS, c1..cn, EOS, PAD...]`` per label as int64, padded to a common length.

        ``length`` (the number of columns) defaults to the longest label + 2.
        """
        longest = max((len(label) for label in labels), default=0)
        width = longest + 2 if length is None else length
        if width < longest + 2:
            raise ValueError(f"length {width} is too short for a label of {longest} characters")
        out = np.full((len(labels), width), self.pad_id, dtype=np.int64)
        out[:, 0] = self.bos_id
        for row, label in enumerate(labels):
            try:
                ids = [self._index[c] for c in label]
            except KeyError as exc:
                raise ValueError(f"label {label!r} has a character outside the charset: {exc}") from None
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out

    def ids_to_text(self, ids: np.ndarray) -> list[str]:
        """Greedy ids ``(B, T)`` -> strings, cut at the first EOS."""
        ids = np.asarray(ids)
        lengths = first_eos(ids)
        chars = self._chars[np.clip(ids, 0, self.num_classes - 1)]
        return ["".join(row[:n]) for row, n in zip(chars, lengths, strict=True)]

    def decode(self, probs: np.ndarray, topk: int = 0) -> list[Prediction]:
        """Softmax outputs ``(B, T, C+1)`` -> predictions, cut at the first EOS.

        ``topk`` > 0 also lists the best ``topk`` characters (EOS excluded) per position.
        """
        probs = np.asarray(probs, dtype=np.float32)
        ids = probs.argmax(-1)
        best = np.take_along_axis(probs, ids[..., None], -1)[..., 0]
        lengths = first_eos(ids)
        texts = self.ids_to_text(ids)
        alternatives = None
        if topk > 0:
            char_probs = probs[..., 1:]
            k = min(topk, char_probs.shape[-1])
            order = np.argsort(-char_probs, axis=-1)[..., :k]
            alternatives = (order + 1, np.take_along_axis(char_probs, order, -1))
        out = []
        for b, (text, n) in enumerate(zip(texts, lengths, strict=True)):
            top: list[list[tuple[str, float]]] = []
            if alternatives is not None:
                idx, p = alternatives[0][b, :n], alternatives[1][b, :n]
                top = [
                    [(str(self._chars[i]), float(q)) for i, q in zip(row_i, row_p, strict=True)]
                    for row_i, row_p in zip(idx, p, strict=True)
                ]
            out.append(Prediction(text, best[b, :n].astype(float).tolist(), top))
        return out


def first_eos(ids: np.ndarray, eos_id: int = 0) -> np.ndarray:
    """Index of the first EOS per row (the row length when there is none)."""
    ids = np.asarray(ids)
    is_eos = ids == eos_id
    return np.where(is_eos.any(-1), is_eos.argmax(-1), ids.shape[-1])


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)
