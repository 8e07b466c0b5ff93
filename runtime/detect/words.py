"""Text lines into words, with a line reader's CTC spaces.

The detector finds lines; the recognizer reads words of at most 25 characters. The project's
own CTC head was trained on single words and has no space, and the distances between its
character spikes separate words poorly (measured in docs/detection.md). PP-OCRv6's full
recognizer, shipped beside the detector in the ``rapidocr`` wheel, reads whole lines and
has a space class: each rectified line goes through it once, and the CTC best path places
every character and every space. A word is a run of characters between spaces; its edges
are its outer characters' centres plus half a character pitch and a margin, never beyond
the space's centre; the first and last word of a line reach the line's ends.

Where the line reader ran words together they are cut again (:func:`cut_token`). A word
of more than :data:`MAX_CHARS` characters is cut into the fewest pieces of at most that many
(near an even split, at the widest spacing there), each piece read alone and the texts
joined into one word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

#: the recognizer reads words of at most this many characters
MAX_CHARS = 25
#: the line reader's input height
LINE_HEIGHT = 48
#: lines are batched with others at most this much wider
BATCH_SPREAD = 1.3
#: a run-together word is cut only at a spacing of at least this many character pitches
JOINT_GAP = 1.6


@dataclass
class WordSpan:
    """A word of a rectified line (columns in line-reader pixels) and the ranges read alone."""

    x0: float
    x1: float
    pieces: list[tuple[float, float]]
    #: the line reader's text for the word (diagnostics)
    line_text: str = ""


@dataclass
class LineChars:
    """What the line reader's best path emitted, in order: characters (``" "`` for a
    space) at frame centres, in line-reader pixels (the line scaled to :data:`LINE_HEIGHT`)."""

    chars: list[str]
    centres: list[float]
    width: float

    @property
    def text(self) -> str:
        return "".join(self.chars)


class LineReader:
    """A CTC line recognizer with a space class (PP-OCRv6's, from the ``rapidocr`` wheel)."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map.get("character", "")
        #: class k (1..): the character; class 0 is blank and the last class the space
        self.classes = ["", *meta.split("\n"), " "] if meta else []

    def __call__(self, crops: Sequence[np.ndarray]) -> list[LineChars]:
        """The characters and spaces of each rectified line crop (RGB uint8 ``(h, w, 3)``)."""
        scaled = [cv2.resize(c, (max(8, int(round(c.shape[1] * LINE_HEIGHT / max(c.shape[0], 1)))), LINE_HEIGHT),
                             interpolation=cv2.INTER_LINEAR) for c in crops]
        out: list[LineChars | None] = [None] * len(crops)
        order = sorted(range(len(crops)), key=lambda k: scaled[k].shape[1])
        while order:
            first = scaled[order[0]].shape[1]
            group = [k for k in order if scaled[k].shape[1] <= first * BATCH_SPREAD][:16]
            order = order[len(group):]
            width = max(scaled[k].shape[1] for k in group)
            batch = np.zeros((len(group), 3, LINE_HEIGHT, width), dtype=np.float32)
            for row, k in enumerate(group):
                bgr = scaled[k][:, :, ::-1].astype(np.float32) / 127.5 - 1.0
                batch[row, :, :, : bgr.shape[1]] = bgr.transpose(2, 0, 1)
            probs = self.session.run(None, {self.input_name: batch})[0]
            frame = width / probs.shape[1]
            for row, k in enumerate(group):
                out[k] = self._chars(probs[row].argmax(-1), frame, float(scaled[k].shape[1]))
        return [o for o in out if o is not None]

    def _chars(self, best: np.ndarray, frame: float, width: float) -> LineChars:
        chars, centres = [], []
        t = 0
        while t < len(best):
            u = t
            while u + 1 < len(best) and best[u + 1] == best[t]:
                u += 1
            x = (t + u + 1) / 2 * frame
            if best[t] != 0 and x < width:
                cls = int(best[t])
                chars.append(self.classes[cls] if cls < len(self.classes) else "?")
                centres.append(x)
            t = u + 1
        return LineChars(chars, centres, width)


def split_words(line: LineChars, margin: float, lexicon: Any | None = None,
                joint_gap: float = JOINT_GAP) -> list[WordSpan]:
    """The words of one line (see the module docstring); ``margin`` in line heights.
    ``lexicon`` (``in`` tests a word) lets :func:`cut_token` split run-together words."""
    tokens: list[list[int]] = [[]]
    for i, c in enumerate(line.chars):
        if c == " ":
            tokens.append([])
        elif not c.isspace():
            tokens[-1].append(i)
    tokens = [t for t in tokens if t]
    if not tokens:
        return [WordSpan(0.0, line.width, [(0.0, line.width)], "")]
    centres = line.centres
    steps = [centres[t[k + 1]] - centres[t[k]] for t in tokens for k in range(len(t) - 1)]
    pitch = float(np.median(steps)) if steps else 0.5 * LINE_HEIGHT
    words = [w for t in tokens for w in cut_token(t, line, pitch, lexicon, joint_gap)]
    reach = pitch / 2 + margin * LINE_HEIGHT
    spans = []
    for n, w in enumerate(words):
        left = 0.0 if n == 0 else max((centres[words[n - 1][-1]] + centres[w[0]]) / 2, centres[w[0]] - reach)
        right = line.width if n == len(words) - 1 else min((centres[w[-1]] + centres[words[n + 1][0]]) / 2,
                                                           centres[w[-1]] + reach)
        spans.append(WordSpan(left, right, _pieces(centres, w, left, right), "".join(line.chars[i] for i in w)))
    return spans


def cut_token(token: list[int], line: LineChars, pitch: float, lexicon: Any | None = None,
              joint_gap: float = JOINT_GAP) -> list[list[int]]:
    """A run of characters without a space, cut where words were run together: around an
    ``&``; at a lower-case letter followed by a capital (``EconoLodge``: at least three
    letters before, two after); and, with a ``lexicon``, a word it does not know at the
    widest spacing of at least ``joint_gap`` pitches that leaves two words it knows
    (``FOREYES``), each at least three letters."""
    chars = [line.chars[i] for i in token]
    cuts: set[int] = set()
    for k, c in enumerate(chars):
        if c == "&":
            cuts.update({k, k + 1})
        elif (0 < k < len(chars) - 1 and c.isupper() and chars[k - 1].islower()
              and sum(ch.isalpha() for ch in chars[max(0, k - 3):k]) == 3 and chars[k + 1].islower()):
            cuts.add(k)
    pieces = _cut(token, cuts)
    if lexicon is None:
        return pieces
    out = []
    for piece in pieces:
        text = "".join(line.chars[i] for i in piece)
        options = []
        if len(piece) >= 6 and text.isalpha() and text not in lexicon:
            for k in range(3, len(piece) - 2):
                spacing = (line.centres[piece[k]] - line.centres[piece[k - 1]]) / max(pitch, 1e-9)
                if spacing >= joint_gap and text[:k] in lexicon and text[k:] in lexicon:
                    options.append((spacing, k))
        out.extend(_cut(piece, {max(options)[1]}) if options else [piece])
    return out


def _cut(token: list[int], cuts: set[int]) -> list[list[int]]:
    bounds = [0, *sorted(k for k in cuts if 0 < k < len(token)), len(token)]
    return [token[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _pieces(centres: Sequence[float], word: list[int], left: float, right: float) -> list[tuple[float, float]]:
    """Column ranges of a word's characters in the fewest pieces of at most :data:`MAX_CHARS`:
    each cut within two characters of an even split, at the widest spacing there (ties: the
    nearest to the even split), in the middle between the two characters."""
    length = len(word)
    count = -(-length // MAX_CHARS)
    cuts, previous = [], 0
    for i in range(1, count):
        target = round(i * length / count)
        low = max(previous + 1, target - 2, length - (count - i) * MAX_CHARS)
        high = min(target + 2, previous + MAX_CHARS, length - 1)
        options = range(low, high + 1) if low <= high else [min(max(target, previous + 1), length - 1)]
        k = max(options, key=lambda j: (round(centres[word[j]] - centres[word[j - 1]], 1), -abs(j - target)))
        cuts.append(k)
        previous = k
    bounds = [0, *cuts, length]
    out = []
    for s, e in zip(bounds, bounds[1:]):
        x0 = left if s == 0 else (centres[word[s - 1]] + centres[word[s]]) / 2
        x1 = right if e == length else (centres[word[e - 1]] + centres[word[e]]) / 2
        out.append((x0, x1))
    return out
