"""Character token ids and decoding of logits: the one implementation.

Token ids (docs/DESIGN.md): EOS = 0, characters 1..C, BOS = C + 1, PAD = C + 2. The
classifier head predicts C + 1 classes (EOS and the characters), never BOS or PAD.
Everything here is numpy; training converts tensors with ``.numpy()`` and calls it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.charset import resolve_charset
from runtime.correction.settings import GapRule, JointRescoring, shipped_char_widths


@dataclass(frozen=True)
class Gap:
    """Where characters are probably missing from a word: the decoder read past an occluded
    (or unreadable) stretch, which shows as a long blank run in the CTC frames."""

    #: index in the word where the missing characters belong (between ``slot - 1`` and ``slot``)
    slot: int
    #: how many characters probably fit there (at least 1)
    missing: int
    #: the distance between the neighbouring characters, in character pitches
    strength: float


@dataclass
class Prediction:
    """One decoded word: text, per-character probabilities and top-k alternatives."""

    text: str
    char_probs: list[float]
    #: per position (same length as ``text``): list of (character, probability), best first
    topk: list[list[tuple[str, float]]] = field(default_factory=list)
    #: per character, the centre of its frames in the CTC output (empty without CTC outputs;
    #: not part of equality: the word read is the same with or without them)
    char_frames: list[float] = field(default_factory=list, compare=False)
    #: slots where characters are probably missing (:func:`find_gaps`; empty without CTC)
    gaps: list[Gap] = field(default_factory=list, compare=False)
    #: the image tower's CTC log-probabilities ``(S, C+1)`` for this crop (None without
    #: them): the corrector scores its candidates with them (:func:`ctc_log_likelihoods`)
    ctc_log_probs: np.ndarray | None = field(default=None, compare=False, repr=False)

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
        #: the charset's characters, for membership tests
        self.characters = frozenset(self.charset)
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
            ids = self.ids(label)
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out

    def ids(self, text: str) -> np.ndarray:
        """The character ids of ``text`` (int64, no BOS or EOS); ``ValueError`` for a
        character outside the charset."""
        try:
            return np.array([self._index[c] for c in text], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"label {text!r} has a character outside the charset: {exc}") from None

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
#: the joint CTC/attention weights and the gap rule were fitted to a model's CTC head: they
#: travel in its bundle (the manifest's ``correction`` section, :mod:`runtime.correction.settings`);
#: the defaults here are that module's, the default model's values
_JOINT = JointRescoring()
_GAPS = GapRule()


def ctc_greedy(log_probs: np.ndarray) -> np.ndarray:
    """Best-path CTC reading of ``(T, C+1)`` log-probabilities (class 0: the blank):
    repeats merged, blanks dropped."""
    best = np.asarray(log_probs).argmax(-1)
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    return best[keep]


def _ctc_states(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CTC's extended label sequence of ``ids`` (blank, c1, blank, c2, ..., blank) and, per
    state, whether it may be reached by skipping the blank before it (a character that
    differs from the one two states back)."""
    labels = np.zeros(2 * len(ids) + 1, dtype=np.int64)
    labels[1::2] = ids
    skip = np.zeros(len(labels), dtype=bool)
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    return labels, skip


def ctc_log_likelihood(log_probs: np.ndarray, ids: np.ndarray) -> float:
    """log P(``ids`` | CTC outputs ``(T, C+1)``, blank 0), summed over every alignment
    (the forward algorithm, in log space); ``-inf`` when ``ids`` cannot fit in T frames."""
    return float(ctc_log_likelihoods(log_probs, [ids])[0])


def ctc_log_likelihoods(log_probs: np.ndarray, words: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`ctc_log_likelihood` of each of ``words`` (id arrays, any lengths) through the
    same ``(T, C+1)`` outputs, in one pass over the frames."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if not len(words):
        return np.zeros(0)
    extended = [_ctc_states(np.asarray(w, dtype=np.int64)) for w in words]
    ends = np.array([len(labels) for labels, _ in extended])
    labels = np.zeros((len(words), int(ends.max())), dtype=np.int64)  # padded with blanks
    skip = np.zeros(labels.shape, dtype=bool)
    for row, (word_labels, word_skip) in enumerate(extended):
        labels[row, : len(word_labels)] = word_labels
        skip[row, : len(word_skip)] = word_skip
    alpha = np.full(labels.shape, -np.inf)
    alpha[:, 0] = log_probs[0, 0]
    if labels.shape[1] > 1:
        alpha[:, 1] = log_probs[0, labels[:, 1]]
    for frame in log_probs[1:]:  # padding states only ever feed later padding states
        merged = alpha.copy()
        merged[:, 1:] = np.logaddexp(merged[:, 1:], alpha[:, :-1])
        merged[:, 2:] = np.where(skip[:, 2:], np.logaddexp(merged[:, 2:], alpha[:, :-2]), merged[:, 2:])
        alpha = merged + frame[labels]
    rows = np.arange(len(words))
    last = alpha[rows, ends - 1]
    before = np.where(ends > 1, alpha[rows, np.maximum(ends - 2, 0)], -np.inf)
    return np.logaddexp(last, before)


def positional_log_likelihood(probs: np.ndarray, ids: np.ndarray, eos_id: int = 0) -> float:
    """log P of ``ids`` then EOS under per-position distributions ``(T, C+1)`` (the EOS
    term only when the word leaves room for it)."""
    targets = np.append(ids, eos_id)[: probs.shape[0]]
    chosen = np.asarray(probs, dtype=np.float64)[np.arange(len(targets)), targets]
    return float(np.log(np.maximum(chosen, 1e-30)).sum())


def joint_score(probs: np.ndarray, ctc_log_probs: np.ndarray, ids: np.ndarray, eos_id: int = 0,
                ctc_weight: float = _JOINT.ctc, decoder_weight: float = _JOINT.decoder) -> float:
    """``ctc_weight * log P_ctc(ids) + decoder_weight * log P_decoder(ids, EOS)`` of one row."""
    score = ctc_weight * ctc_log_likelihood(ctc_log_probs, ids)
    if decoder_weight:
        score += decoder_weight * positional_log_likelihood(probs, ids, eos_id)
    return score


def ctc_rescored(codec: CharCodec, probs: np.ndarray, ctc_log_probs: np.ndarray, topk: int = 0,
                 ctc_weight: float = _JOINT.ctc, decoder_weight: float = _JOINT.decoder,
                 gap_rule: GapRule | None = None, fill_gaps: bool = _JOINT.fill_gaps,
                 fill_slack: int = _JOINT.fill_slack) -> list[Prediction]:
    """Predictions of the decoder's ``probs`` ``(B, T, C+1)``, each replaced by the image
    tower's CTC reading (``ctc_log_probs`` ``(B, S, C+1)``) when that reading has the higher
    :func:`joint_score`: joint CTC/attention rescoring of two candidates (the decoder's
    word, the CTC best path). Characters keep the decoder's per-position probabilities, so
    the confidence gate sees how sure the decoder is of the chosen word. ``gap_rule``:
    where :func:`find_gaps` reports missing characters (default: the default model's).
    ``fill_gaps``: a chosen CTC reading with gaps takes the decoder's characters there
    (:func:`gap_filled`, at most ``missing + fill_slack`` per gap)."""
    probs = np.asarray(probs, dtype=np.float32)
    gap_args = (gap_rule or _GAPS).find_gaps_args()
    out = []
    for row, ctc_row in zip(probs, np.asarray(ctc_log_probs, dtype=np.float32), strict=True):
        decoded = row.argmax(-1)
        decoded = decoded[: first_eos(decoded)]
        best_path = ctc_greedy(ctc_row)
        greedy = best_path[: row.shape[0] - 1]
        chosen = decoded
        weights = {"ctc_weight": ctc_weight, "decoder_weight": decoder_weight}
        if (len(greedy) and not np.array_equal(greedy, decoded)
                and joint_score(row, ctc_row, greedy, codec.eos_id, **weights)
                > joint_score(row, ctc_row, decoded, codec.eos_id, **weights)):
            chosen = greedy
        prediction = _located(codec, row, ctc_row, chosen, best_path, topk, gap_args)
        if fill_gaps and prediction.gaps and not np.array_equal(chosen, decoded):
            filled = gap_filled(chosen, decoded, {g.slot: g.missing + fill_slack for g in prediction.gaps})
            if filled is not None and len(filled) < row.shape[0]:
                frames = filled_frames(prediction.char_frames, chosen, filled)
                prediction = codec.prediction(row, np.append(filled, codec.eos_id), topk)
                prediction.char_frames = frames
                prediction.gaps = find_gaps(frames, text=prediction.text, **gap_args)
                prediction.ctc_log_probs = ctc_row
        out.append(prediction)
    return out


def filled_frames(frames: Sequence[float], reading: Sequence[int], filled: Sequence[int]) -> list[float]:
    """The CTC frame centres of ``filled`` (``reading`` with characters inserted, as
    :func:`gap_filled` makes it): the read characters keep ``frames``; the inserted ones
    are spread evenly over the gap between their neighbours (the CTC head saw nothing there
    to place them by)."""
    if len(frames) != len(reading):
        return []
    inserted = insertions(reading, filled)
    out: list[float] = []
    for slot in range(len(reading) + 1):
        chars = inserted.get(slot, [])
        if chars:
            left = frames[slot - 1] if slot > 0 else frames[0] - len(chars)
            right = frames[slot] if slot < len(reading) else frames[-1] + len(chars)
            out.extend(left + (right - left) * (k + 1) / (len(chars) + 1) for k in range(len(chars)))
        if slot < len(reading):
            out.append(float(frames[slot]))
    return out


def _located(codec: CharCodec, row: np.ndarray, ctc_row: np.ndarray, chosen: np.ndarray, best_path: np.ndarray,
             topk: int, gap_args: dict) -> Prediction:
    """The word ``chosen`` with the decoder's probabilities, its CTC frames and gaps."""
    prediction = codec.prediction(row, np.append(chosen, codec.eos_id), topk)
    same = np.array_equal(chosen, best_path)  # the best path reads this very word
    alignment = best_path_alignment(ctc_row) if same else ctc_alignment(ctc_row, chosen)
    if alignment is not None:
        prediction.char_frames = character_centres(alignment, len(chosen))
        prediction.gaps = find_gaps(prediction.char_frames, text=prediction.text, **gap_args)
    prediction.ctc_log_probs = ctc_row
    return prediction


def insertions(reading: Sequence[int], proposal: Sequence[int]) -> dict[int, list[int]]:
    """Per slot of ``reading`` (0 before its first character, ``len(reading)`` after its
    last), the characters of ``proposal`` that a minimal edit alignment of the two inserts
    there. Ties go to matches, then insertions, then substitutions."""
    reading, proposal = list(reading), list(proposal)
    n, m = len(reading), len(proposal)
    cost = np.zeros((n + 1, m + 1), dtype=np.int64)
    cost[:, 0], cost[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                             cost[i - 1, j - 1] + (reading[i - 1] != proposal[j - 1]))
    out: dict[int, list[int]] = {}
    i, j = n, m
    while i or j:
        if i and j and reading[i - 1] == proposal[j - 1] and cost[i, j] == cost[i - 1, j - 1]:
            i, j = i - 1, j - 1
        elif j and cost[i, j] == cost[i, j - 1] + 1:
            out.setdefault(i, []).insert(0, proposal[j - 1])
            j -= 1
        elif i and j and cost[i, j] == cost[i - 1, j - 1] + 1:
            i, j = i - 1, j - 1
        else:
            i -= 1
    return out


def gap_filled(reading: Sequence[int], proposal: Sequence[int], room: Mapping[int, int]) -> np.ndarray | None:
    """``reading`` with the characters ``proposal`` inserts at its slots (:func:`insertions`)
    where ``room`` allows: slot -> at most that many characters. Every character of
    ``reading`` stays; what ``proposal`` substitutes or drops is ignored. None when nothing
    is inserted."""
    added = {slot: chars for slot, chars in insertions(reading, proposal).items()
             if 0 < len(chars) <= room.get(slot, 0)}
    if not added:
        return None
    out: list[int] = []
    for slot, char in enumerate([*reading, None]):
        out.extend(added.get(slot, ()))
        if char is not None:
            out.append(char)
    return np.asarray(out, dtype=np.int64)


# -- where characters are missing -----------------------------------------------------------
# The rule's constants (:class:`runtime.correction.settings.GapRule`) were chosen on
# validation data carved from the training crops, never on test sets (``python -m
# benchmarks.correction gaps`` and ``tune``; docs/correction.md): on the occluded validation
# words the rule finds the slot of 80% (one covered) and 77% (two covered) of the skipped
# characters, and flags 6 of the 312 correctly read real validation crops.


def char_widths() -> dict[str, float]:
    """The shipped relative character widths (empty when the file is missing)."""
    return shipped_char_widths()


def ctc_alignment(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """The most probable CTC path (Viterbi) of the word ``ids`` through ``(T, C+1)``
    log-probabilities (blank 0): per frame the index in ``ids`` of the character it emits,
    or -1 for a blank. ``None`` when the word cannot fit in T frames."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    frames = log_probs.shape[0]
    labels, skip = _ctc_states(ids)
    states = len(labels)
    score = np.full(states, -np.inf)
    score[0] = log_probs[0, 0]
    if states > 1:
        score[1] = log_probs[0, labels[1]]
    back = np.zeros((frames, states), dtype=np.int8)  # how many states back the best came from
    for t in range(1, frames):
        options = np.full((3, states), -np.inf)
        options[0] = score
        options[1, 1:] = score[:-1]
        options[2, 2:] = np.where(skip[2:], score[:-2], -np.inf)
        step = options.argmax(0)
        back[t] = step
        score = options[step, np.arange(states)] + log_probs[t, labels]
    ends = [states - 1] + ([states - 2] if states > 1 else [])
    state = max(ends, key=lambda e: score[e])
    if not np.isfinite(score[state]):
        return None
    path = np.empty(frames, dtype=np.int64)
    for t in range(frames - 1, -1, -1):
        path[t] = state
        state -= int(back[t, state])
    return np.where(path % 2 == 1, (path - 1) // 2, -1)


def best_path_alignment(log_probs: np.ndarray) -> np.ndarray:
    """The alignment (as :func:`ctc_alignment` gives it) of the CTC best path with its own
    reading, :func:`ctc_greedy`: per frame the character index or -1."""
    best = np.asarray(log_probs).argmax(-1)
    starts = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    index = np.cumsum(starts) - 1
    return np.where(best != 0, index, -1)


def character_centres(alignment: np.ndarray, length: int) -> list[float]:
    """The mean frame of each of ``length`` characters in an alignment (per frame a
    character index or -1)."""
    alignment = np.asarray(alignment)
    frames = np.arange(len(alignment), dtype=np.float64)
    return [float(frames[alignment == j].mean()) for j in range(length)]


def pair_widths(text: str | None, pairs: int, widths: Mapping[str, float] | None = None) -> np.ndarray:
    """Per pair of neighbouring characters of ``text``, the distance between their centres
    in widths of a median character (the mean of the two ``widths``, default
    :func:`char_widths`): 1.0 each when ``text`` is None or has not ``pairs + 1`` characters."""
    if text is None or len(text) != pairs + 1:
        return np.ones(pairs)
    widths = char_widths() if widths is None else widths
    return np.array([(widths.get(a, 1.0) + widths.get(b, 1.0)) / 2 for a, b in zip(text, text[1:])])


def character_pitch(centres: Sequence[float], prior: float = _GAPS.prior_pitch,
                    min_distances: int = _GAPS.min_distances, text: str | None = None,
                    widths: Mapping[str, float] | None = None) -> float:
    """A word's character pitch in frames: the median distance between neighbouring
    characters (each divided by its :func:`pair_widths` when the word's ``text`` is given),
    pulled towards ``prior`` when the word has fewer than ``min_distances``."""
    distances = np.diff(np.asarray(centres, dtype=np.float64))
    distances = distances / pair_widths(text, len(distances), widths)
    if len(distances) >= min_distances:
        return float(np.median(distances))
    return float(np.median([*distances, *[prior] * (min_distances - len(distances))]))


def expected_distances(centres: Sequence[float], text: str | None = None, prior: float = _GAPS.prior_pitch,
                       min_distances: int = _GAPS.min_distances,
                       widths: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The distances between neighbouring character centres, the distance expected for each
    pair (the pitch times the pair's :func:`pair_widths`) and the pitch
    (:func:`character_pitch`)."""
    distances = np.diff(np.asarray(centres, dtype=np.float64))
    pitch = character_pitch(centres, prior, min_distances, text, widths)
    return distances, pitch * pair_widths(text, len(distances), widths), pitch


def find_gaps(centres: Sequence[float], ratio: float = _GAPS.ratio, prior: float = _GAPS.prior_pitch,
              min_distances: int = _GAPS.min_distances, min_extra: float = _GAPS.min_extra,
              text: str | None = None, widths: Mapping[str, float] | None = None) -> list[Gap]:
    """Slots between neighbouring characters (centres in CTC frames) at least ``ratio`` times
    and ``min_extra`` frames farther apart than expected (:func:`expected_distances`: with
    ``text``, an "m" next to a "g" is no gap), strongest first; ``missing`` = the extra
    distance in pitches, rounded (at least 1)."""
    if len(centres) < 2:
        return []
    distances, expected, pitch = expected_distances(centres, text, prior, min_distances, widths)
    if not pitch > 0:
        return []
    out = []
    for j, (distance, normal) in enumerate(zip(distances, expected, strict=True)):
        strength = float(distance / normal)
        if strength >= ratio and distance - normal >= min_extra:
            out.append(Gap(j + 1, max(1, int(round((distance - normal) / pitch))), strength))
    return sorted(out, key=lambda g: -g.strength)


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
