"""Choosing a fine-tune's specialist (:mod:`runtime.specialist`) on its validation and keep sets.

Torch-free: the rows are scored from readings made elsewhere. The general tower is the original
or the chosen weight mix; the specialist is the tower at the
end of the schedule. Every pair (general, ``below_confidence`` on a grid, or no specialist) is
scored from each tower's CTC readings of the sets, exactly as the runtime combines them
(:meth:`SpecialistSettings.choose`), under the rule the mixes are chosen by: the most
validation words while no keep set loses more than the tolerance of the words the original
read right (:func:`keeps`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.charset import WordAccuracy, word_correct
from runtime.specialist import SpecialistSettings

#: (text, confidence) of one crop's CTC reading
Reading = tuple[str, float]
#: the validation set's key among the sets scored (the keep sets are keyed by their paths, and no
#: path holds a NUL, so a keep set named "val" cannot take its place)
VAL = "\0val"
#: the thresholds tried: a crop read less confidently than this by the general tower is asked
BELOW_GRID = (0.5, 0.7, 0.9, 0.97)


def keeps(row: dict[str, Any], original: dict[str, Any], tolerance: float) -> bool:
    """Whether a row (a mix, or a mix with a specialist) keeps what the original read: on every
    keep set, at most ``tolerance`` points of its crops are words the original read right and
    the row reads wrong (``keep_broken``; words gained elsewhere do not make up for them). A row
    whose reading was ``stopped`` (a keep set had already lost too many) does not."""
    if row.get("stopped"):
        return False
    return all(row["keep_broken"][name] <= tolerance + 1e-9 for name in original["keep_ctc"])


def most_broken(crops: int, tolerance: float) -> int:
    """The most words of a keep set of ``crops`` that may be broken within ``tolerance`` percent
    (:func:`keeps`'s rule as a count)."""
    return math.floor(tolerance * crops / 100.0 + 1e-7)


def rights(texts: Sequence[str], labels: Sequence[str]) -> list[bool]:
    """Whether each text reads its label (the protocol's comparison)."""
    return [word_correct(text, label) for text, label in zip(texts, labels, strict=True)]


def right_before(original: Mapping[str, Sequence[Reading]],
                 labels: Mapping[str, Sequence[str]]) -> dict[str, list[bool]]:
    """Which crops of each keep set (every name but :data:`VAL`) the original's readings read right."""
    return {name: rights([text for text, _ in original[name]], labels[name]) for name in labels if name != VAL}


def broken_pct(texts: Sequence[str], labels: Sequence[str], before: Sequence[bool]) -> float:
    """Percent of the crops read right ``before`` that ``texts`` reads wrong (of all the crops)."""
    now = rights(texts, labels)
    return 100.0 * sum(was and not right for was, right in zip(before, now, strict=True)) / max(1, len(now))


def accuracy(texts: Sequence[str], labels: Sequence[str]) -> float:
    """Word accuracy (%, the protocol) of ``texts``."""
    meter = WordAccuracy()
    meter.update(texts, labels)
    return float(meter.accuracy)


def gated(general: Sequence[Reading], special: Sequence[Reading], settings: SpecialistSettings | None) -> list[str]:
    """The texts read with ``settings`` (None: the general readings alone)."""
    if settings is None:
        return [text for text, _ in general]
    return [settings.choose(g, s) for g, s in zip(general, special, strict=True)]


def score(general: Mapping[str, Sequence[Reading]], special: Mapping[str, Sequence[Reading]],
          labels: Mapping[str, Sequence[str]], settings: SpecialistSettings | None,
          before: Mapping[str, Sequence[bool]] | None = None) -> dict[str, Any]:
    """Accuracy on :data:`VAL` and each keep set (every other name), the share of validation
    crops the specialist reads and, given ``before`` (which keep crops the original reads
    right), the percent of each keep set broken (:func:`broken_pct`)."""
    val = general[VAL]
    asked = sum(settings.wants(*g) for g in val) if settings else 0
    texts = {name: gated(general[name], special[name], settings) for name in labels}
    row = {"val_ctc": accuracy(texts[VAL], labels[VAL]),
           "keep_ctc": {name: accuracy(texts[name], labels[name]) for name in labels if name != VAL},
           "asked_pct": round(100.0 * asked / max(1, len(val)), 2)}
    if before is not None:
        row["keep_broken"] = {name: broken_pct(texts[name], labels[name], before[name])
                              for name in labels if name != VAL}
    return row


def choose_specialist(generals: Mapping[float, Mapping[str, Sequence[Reading]]],
                      special: Mapping[str, Sequence[Reading]], labels: Mapping[str, Sequence[str]],
                      tolerance: float, grid: Sequence[float] = BELOW_GRID,
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chosen row and every row scored. ``generals``: readings per general mix (``alpha``;
    0, the original, must be there); ``special``, ``labels``: per set (:data:`VAL` and the keep sets).
    A row: ``alpha``, ``below`` (None: no specialist), ``val_ctc``, ``keep_ctc``, ``asked_pct``.
    Ties go to no specialist, then the higher mean keep accuracy, then the lower threshold (fewer
    crops read twice), then the smaller mix."""
    before = right_before(generals[0.0], labels)
    rows = []
    for alpha, general in sorted(generals.items()):
        for below in (None, *grid):
            settings = SpecialistSettings(below) if below is not None else None
            rows.append({"alpha": alpha, "below": below, **score(general, special, labels, settings, before)})
    original = next(row for row in rows if row["alpha"] == 0.0 and row["below"] is None)

    def key(row: dict[str, Any]) -> tuple:
        mean_keep = sum(row["keep_ctc"].values()) / max(1, len(row["keep_ctc"]))
        return row["val_ctc"], row["below"] is None, mean_keep, -(row["below"] or 0.0), -row["alpha"]

    return max((row for row in rows if keeps(row, original, tolerance)), key=key), rows
