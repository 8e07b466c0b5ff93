"""Text lines into words, with the recognizer's own CTC frames.

The detector finds lines; the recognizer reads words of at most 25 characters. Each line,
rectified and scaled to the recognizer's input height, goes through the image encoder alone
(in windows of the encoder's widest input, overlapping by :data:`OVERLAP` heights, for long
lines); the CTC best path places every character it reads. Neighbouring characters much
farther apart than the line's character pitch predicts (``runtime.decoding.expected_distances``,
with the characters' relative widths) are a word gap: the charset has no space, so a space
shows as a long run of blank frames. A word of more than :data:`MAX_CHARS` characters is cut
at its widest gaps into pieces of at most that many, each read alone, and their texts joined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.decoding import best_path_alignment, char_widths, character_centres, expected_distances
from runtime.preprocess import Preprocessing, preprocess, width_groups

#: the recognizer reads words of at most this many characters
MAX_CHARS = 25
#: windows over a long line overlap by this many line heights
OVERLAP = 1.0


@dataclass
class WordSpan:
    """A word of a rectified line: its columns and, for an over-long word, its pieces'."""

    x0: float
    x1: float
    #: the column ranges read one by one (one range for a word of at most MAX_CHARS characters)
    pieces: list[tuple[float, float]]
    #: the characters the CTC path placed in it (its best-path reading, for diagnostics)
    ctc_text: str = ""


@dataclass
class LineChars:
    """The characters the CTC best path read in a line, at the recognizer's input scale."""

    text: str
    #: centres in input pixels (the line scaled to the input height)
    centres: list[float]
    #: input pixels per CTC frame
    frame: float
    #: the line's width in input pixels
    width: float


EncoderRun = Callable[[np.ndarray], np.ndarray]


def _windows(width: int, limit: int, overlap: int) -> list[tuple[int, int]]:
    """Column windows of at most ``limit`` covering ``width``, overlapping by ``overlap``."""
    if width <= limit:
        return [(0, width)]
    step = max(1, limit - overlap)
    starts = list(range(0, width - limit, step)) + [width - limit]
    return [(s, s + limit) for s in starts]


def line_characters(crops: Sequence[np.ndarray], spec: Preprocessing, charset: str, encode: EncoderRun,
                    batch_size: int = 32) -> list[LineChars]:
    """The CTC characters of each rectified line crop (RGB uint8 ``(h, w, 3)``).
    ``encode`` maps a preprocessed batch to its ``ctc_log_probs`` ``(B, S, C+1)``."""
    height = spec.height
    scaled, jobs = [], []  # jobs: (line, window start, window end)
    for k, crop in enumerate(crops):
        h, w = crop.shape[:2]
        width = max(spec.width_multiple, int(round(w * height / max(h, 1))))
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BILINEAR)
        scaled.append(image)
        for start, end in _windows(width, spec.width, int(OVERLAP * height)):
            jobs.append((k, start, end))
    pieces = [scaled[k].crop((s, 0, e, height)) for k, s, e in jobs]
    found: list[list[tuple[float, str]]] = [[] for _ in crops]
    frames = [float(spec.width_multiple)] * len(crops)
    for group in width_groups([p.size for p in pieces], spec, batch_size):
        batch = preprocess([pieces[i] for i in group], spec)
        log_probs = encode(batch)
        frame = batch.shape[-1] / log_probs.shape[1]
        for row, i in enumerate(group):
            k, start, end = jobs[i]
            frames[k] = frame
            best = log_probs[row].argmax(-1)
            alignment = best_path_alignment(log_probs[row])
            count = int(alignment.max()) + 1 if alignment.size and alignment.max() >= 0 else 0
            centres = character_centres(alignment, count)
            ids = [int(best[alignment == j][0]) for j in range(count)]
            own_start = start + (OVERLAP * height / 2 if start > 0 else 0.0)
            own_end = end - (OVERLAP * height / 2 if end < scaled[k].width else 0.0)
            for c, char_id in zip(centres, ids):
                x = start + (c + 0.5) * frame
                if own_start <= x < own_end or (end >= scaled[k].width and x >= own_end):
                    found[k].append((x, charset[char_id - 1] if 0 < char_id <= len(charset) else "?"))
            found[k].sort()
    return [LineChars("".join(c for _, c in chars), [x for x, _ in chars], frames[k], float(scaled[k].width))
            for k, chars in enumerate(found)]


def split_words(line: LineChars, ratio: float, margin: float, height: float) -> list[WordSpan]:
    """Word spans of one line (input pixels): gaps at least ``ratio`` times the expected
    distance; inner word edges ``margin`` heights beyond their characters (at most to the
    middle of the gap); the first and last word reach the line's ends."""
    n = len(line.centres)
    if n == 0:
        return [WordSpan(0.0, line.width, [(0.0, line.width)], "")]
    frames = [x / line.frame for x in line.centres]
    cuts: list[int] = []
    strengths: list[float] = []
    half = [0.0] * n
    if n >= 2:
        distances, expected, pitch = expected_distances(frames, line.text)
        strengths = list(distances / np.maximum(expected, 1e-9))
        cuts = [j + 1 for j, s in enumerate(strengths) if s >= ratio]
        widths = char_widths()
        half = [pitch * widths.get(c, 1.0) / 2 * line.frame for c in line.text]
    else:
        half = [0.5 * height * 0.5]
    bounds = [0, *cuts, n]
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        left = 0.0 if a == 0 else max((line.centres[a - 1] + line.centres[a]) / 2,
                                      line.centres[a] - half[a] - margin * height)
        right = line.width if b == n else min((line.centres[b - 1] + line.centres[b]) / 2,
                                              line.centres[b - 1] + half[b - 1] + margin * height)
        pieces = _pieces(line, a, b, strengths, left, right)
        spans.append(WordSpan(left, right, pieces, line.text[a:b]))
    return spans


def _pieces(line: LineChars, a: int, b: int, strengths: list[float], left: float,
            right: float) -> list[tuple[float, float]]:
    """Column ranges of characters ``a..b-1`` in pieces of at most :data:`MAX_CHARS`, cut at
    the widest gaps (the middle between the two characters)."""
    groups = [(a, b)]
    while any(e - s > MAX_CHARS for s, e in groups):
        s, e = next(g for g in groups if g[1] - g[0] > MAX_CHARS)
        # the widest gap leaving both sides non-empty, preferring cuts that shorten the longer side
        inner = range(s + 1, e)
        j = max(inner, key=lambda k: (strengths[k - 1] if k - 1 < len(strengths) else 0.0)
                - (0.0 if max(k - s, e - k) <= MAX_CHARS else 10.0))
        i = groups.index((s, e))
        groups[i:i + 1] = [(s, j), (j, e)]
    out = []
    for s, e in groups:
        x0 = left if s == a else (line.centres[s - 1] + line.centres[s]) / 2
        x1 = right if e == b else (line.centres[e - 1] + line.centres[e]) / 2
        out.append((x0, x1))
    return out
