"""Words read by the image tower's own CTC head (the ``ctc_log_probs`` output of a PP-OCR
tower's image encoder), without the decoders: ``--decode ctc``, and the first pass of
``--decode cascade``.

A character's probability is the highest the head gives it over the frames of its run in the
best path; its alternatives are the head's best characters at that frame (the blank left
out), so the confidence gate and the corrector see a CTC reading as they see a decoder's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.decoding import (
    CharCodec,
    Prediction,
    best_path_alignment,
    character_centres,
    ctc_greedy,
    find_gaps,
)

#: How :class:`~runtime.recognizer.Recognizer` reads: ``full`` the method (both decoders,
#: CTC rescoring), ``ctc`` the tower's CTC head alone, ``cascade`` the CTC head first and the
#: decoders only for the words the confidence gate does not trust. Without a corrector, ``full``
#: and ``cascade`` also fill CTC gaps from spelling (:mod:`runtime.lm_fill`).
DECODE_MODES = ("full", "ctc", "cascade")


def ctc_prediction(codec: CharCodec, log_probs: np.ndarray, topk: int = 0, gap_rule: Any = None) -> Prediction:
    """The best-path reading of one crop's ``(S, C+1)`` CTC log-probabilities (class 0: blank);
    ``gap_rule`` (:class:`runtime.correction.settings.GapRule`, default: the default model's)
    finds where characters are missing."""
    log_probs = np.asarray(log_probs, dtype=np.float32)
    ids = ctc_greedy(log_probs)
    alignment = best_path_alignment(log_probs)
    probs = np.exp(log_probs)
    char_probs: list[float] = []
    top: list[list[tuple[str, float]]] = []
    for j, char in enumerate(ids):
        frames = np.flatnonzero(alignment == j)
        best = int(frames[np.argmax(probs[frames, char])])
        char_probs.append(float(probs[best, char]))
        if topk > 0:
            row = probs[best, 1:]
            order = np.argsort(-row)[:topk]
            top.append([(codec.charset[k], float(row[k])) for k in order])
    prediction = Prediction("".join(codec.charset[c - 1] for c in ids), char_probs, top)
    if len(ids):
        prediction.char_frames = character_centres(alignment, len(ids))
        gap_args = gap_rule.find_gaps_args() if gap_rule is not None else {}
        prediction.gaps = find_gaps(prediction.char_frames, text=prediction.text, **gap_args)
    prediction.ctc_log_probs = log_probs
    return prediction


def ctc_predictions(codec: CharCodec, log_probs: np.ndarray, topk: int = 0, gap_rule: Any = None) -> list[Prediction]:
    """:func:`ctc_prediction` of each row of a ``(B, S, C+1)`` batch."""
    return [ctc_prediction(codec, row, topk, gap_rule) for row in np.asarray(log_probs)]
