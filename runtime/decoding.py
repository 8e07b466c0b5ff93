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
        return [self.prediction(row, ids, topk) for row, ids in zip(probs, probs.argmax(-1), strict=True)]

    def prediction(self, probs: np.ndarray, ids: np.ndarray, topk: int = 0) -> Prediction:
        """The word ``ids`` (one row, cut at the first EOS) read from the per-position
        distributions ``probs`` ``(T, C+1)``: each character's probability is the one
        ``probs`` gives it at its position, ``topk`` alternatives as in :meth:`decode`."""
        ids = np.asarray(ids)[: probs.shape[0]]
        n = int(first_eos(ids))
        ids = ids[:n]
        chosen = probs[np.arange(n), ids].astype(float).tolist()
        top: list[list[tuple[str, float]]] = []
        if topk > 0:
            char_probs = probs[:n, 1:]
            order = np.argsort(-char_probs, axis=-1)[:, : min(topk, char_probs.shape[-1])]
            chars, values = self._chars[order + 1], np.take_along_axis(char_probs, order, -1)
            top = [[(str(c), float(q)) for c, q in zip(row_c, row_q, strict=True)]
                   for row_c, row_q in zip(chars, values, strict=True)]
        return Prediction("".join(self._chars[ids]), chosen, top)


# -- joint CTC / attention choice ----------------------------------------------------------
#: weights of the two log-likelihoods in :func:`joint_score` (chosen on the validation split
#: carved from training crops: docs/training-on-a-cpu.md)
CTC_WEIGHT = 1.0
DECODER_WEIGHT = 1.0


def ctc_greedy(log_probs: np.ndarray) -> np.ndarray:
    """Best-path CTC reading of ``(T, C+1)`` log-probabilities (class 0: the blank):
    repeats merged, blanks dropped."""
    best = np.asarray(log_probs).argmax(-1)
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    return best[keep]


def ctc_log_likelihood(log_probs: np.ndarray, ids: np.ndarray) -> float:
    """log P(``ids`` | CTC outputs ``(T, C+1)``, blank 0), summed over every alignment
    (the forward algorithm, in log space); ``-inf`` when ``ids`` cannot fit in T frames."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    labels = np.zeros(2 * len(ids) + 1, dtype=np.int64)
    labels[1::2] = ids
    states = len(labels)
    # a label state may skip the blank before it when it differs from the label two back
    skip = np.zeros(states, dtype=bool)
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    alpha = np.full(states, -np.inf)
    alpha[0] = log_probs[0, 0]
    if states > 1:
        alpha[1] = log_probs[0, labels[1]]
    for frame in log_probs[1:]:
        merged = alpha.copy()
        merged[1:] = np.logaddexp(merged[1:], alpha[:-1])
        merged[2:] = np.where(skip[2:], np.logaddexp(merged[2:], alpha[:-2]), merged[2:])
        alpha = merged + frame[labels]
    return float(np.logaddexp(alpha[-1], alpha[-2]) if states > 1 else alpha[-1])


def positional_log_likelihood(probs: np.ndarray, ids: np.ndarray, eos_id: int = 0) -> float:
    """log P of ``ids`` then EOS under per-position distributions ``(T, C+1)`` (the EOS
    term only when the word leaves room for it)."""
    targets = np.append(ids, eos_id)[: probs.shape[0]]
    chosen = np.asarray(probs, dtype=np.float64)[np.arange(len(targets)), targets]
    return float(np.log(np.maximum(chosen, 1e-30)).sum())


def joint_score(probs: np.ndarray, ctc_log_probs: np.ndarray, ids: np.ndarray, eos_id: int = 0) -> float:
    """``CTC_WEIGHT * log P_ctc(ids) + DECODER_WEIGHT * log P_decoder(ids, EOS)`` of one row."""
    return (CTC_WEIGHT * ctc_log_likelihood(ctc_log_probs, ids)
            + DECODER_WEIGHT * positional_log_likelihood(probs, ids, eos_id))


def ctc_rescored(codec: CharCodec, probs: np.ndarray, ctc_log_probs: np.ndarray,
                 topk: int = 0) -> list[Prediction]:
    """Predictions of the decoder's ``probs`` ``(B, T, C+1)``, each replaced by the image
    tower's CTC reading (``ctc_log_probs`` ``(B, S, C+1)``) when that reading has the higher
    :func:`joint_score`: joint CTC/attention rescoring of two candidates (the decoder's
    word, the CTC best path). Characters keep the decoder's per-position probabilities, so
    the confidence gate sees how sure the decoder is of the chosen word."""
    probs = np.asarray(probs, dtype=np.float32)
    out = []
    for row, ctc_row in zip(probs, np.asarray(ctc_log_probs, dtype=np.float32), strict=True):
        decoded = row.argmax(-1)
        decoded = decoded[: first_eos(decoded)]
        greedy = ctc_greedy(ctc_row)[: row.shape[0] - 1]
        chosen = decoded
        if (len(greedy) and not np.array_equal(greedy, decoded)
                and joint_score(row, ctc_row, greedy, codec.eos_id) > joint_score(row, ctc_row, decoded, codec.eos_id)):
            chosen = greedy
        out.append(codec.prediction(row, np.append(chosen, codec.eos_id), topk))
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
