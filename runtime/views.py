"""Reading a doubtful crop again under other views (``--views``).

A crop whose CTC reading is not confident (or empty) is encoded again, stretched
horizontally by each of the bundle's factors (a wider input gives the tower's CTC head more
frames per character); every view's best path is a candidate, and the candidate with the
highest CTC log-likelihood summed over all views, the first reading included, is the word.
Before that, a crop at least as tall as wide whose reading is doubtful is also read turned a
quarter each way (words written down or up a pole); the more confident turned reading replaces
the upright one when it is surer by a margin, and the stretched views then read the turned crop.
The settings are fitted to a model on its validation split (``python -m export.views``) and
travel in its manifest as ``defaults.views``; a bundle without them reads one view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from runtime.decoding import ctc_greedy, ctc_log_likelihoods

#: ``--views``: ``auto`` reads again with the bundle's ``defaults.views`` (none: one view), ``off`` never
VIEW_CHOICES = ("auto", "off")
#: the manifest key (under ``defaults``)
MANIFEST_KEY = "views"


@dataclass(frozen=True)
class TurnSettings:
    """Which crops are also read turned a quarter each way: at least ``min_aspect`` times as
    tall as wide, and read as nothing or less confidently than ``below_confidence``. The more
    confident turned reading replaces the upright one when it is surer by more than ``margin``."""

    min_aspect: float
    below_confidence: float
    margin: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_aspect) and self.min_aspect > 0.0):
            raise ValueError(f"views.turns: min_aspect must be a positive height/width ratio, not {self.min_aspect}")
        if not 0.0 <= self.below_confidence <= 1.0:
            raise ValueError(f"views.turns: below_confidence must be within [0, 1], not {self.below_confidence}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"views.turns: margin must be within [0, 1), not {self.margin}")

    def to_dict(self) -> dict[str, Any]:
        return {"min_aspect": self.min_aspect, "below_confidence": self.below_confidence, "margin": self.margin}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnSettings:
        return cls(float(data["min_aspect"]), float(data["below_confidence"]), float(data["margin"]))

    def wants(self, size: tuple[int, int], text: str, confidence: float) -> bool:
        """Whether a crop of ``size`` (width, height) read as ``text`` is also read turned."""
        width, height = size
        return height >= self.min_aspect * width and (not text or confidence < self.below_confidence)

    def prefers(self, upright: tuple[str, float], turned: tuple[str, float]) -> bool:
        """Whether the ``turned`` reading (text, confidence) replaces the ``upright`` one."""
        return surer(turned, upright, self.margin)


def surety(text: str, confidence: float) -> float:
    """A reading's confidence for comparing readings: 0 when it read nothing."""
    return confidence if text else 0.0


def surer(challenger: tuple[str, float], reading: tuple[str, float], margin: float = 0.0) -> bool:
    """Whether the ``challenger`` reading (text, confidence) replaces ``reading``: it read
    something, more confidently by more than ``margin`` (a reading of nothing counts as 0)."""
    return bool(challenger[0]) and challenger[1] > surety(*reading) + margin


def turned(image: Image.Image, clockwise: bool) -> Image.Image:
    """``image`` turned a quarter clockwise (a word written downwards comes upright) or
    anticlockwise (a word written upwards)."""
    return image.transpose(Image.Transpose.ROTATE_270 if clockwise else Image.Transpose.ROTATE_90)


@dataclass(frozen=True)
class ViewSettings:
    """Which crops are read again (CTC confidence below ``below_confidence``, or nothing read)
    and the horizontal stretch of each extra view; ``turns``: which crops are also read turned
    (none when None). Without turns there must be stretches."""

    stretches: tuple[float, ...]
    below_confidence: float
    turns: TurnSettings | None = None

    def __post_init__(self) -> None:
        if (not self.stretches and self.turns is None) or any(
                not (math.isfinite(s) and 0.25 <= s <= 4.0) for s in self.stretches):
            raise ValueError(f"views: stretches must be factors within [0.25, 4], not {list(self.stretches)}")
        if not 0.0 <= self.below_confidence <= 1.0:
            raise ValueError(f"views: below_confidence must be within [0, 1], not {self.below_confidence}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stretches": list(self.stretches), "below_confidence": self.below_confidence}
        if self.turns is not None:
            out["turns"] = self.turns.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewSettings:
        turns = data.get("turns")
        return cls(tuple(float(s) for s in data["stretches"]), float(data["below_confidence"]),
                   TurnSettings.from_dict(turns) if turns is not None else None)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ViewSettings | None:
        """The manifest's ``defaults.views`` (None when absent); ``ValueError`` when malformed."""
        defaults = manifest.get("defaults")
        section = defaults.get(MANIFEST_KEY) if isinstance(defaults, dict) else None
        if section is None:
            return None
        try:
            return cls.from_dict(section)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"defaults.{MANIFEST_KEY}: {exc} (it needs 'stretches', factors, and "
                             "'below_confidence'; 'turns' needs 'min_aspect', 'below_confidence' and "
                             "'margin')") from None

    def wants(self, text: str, confidence: float) -> bool:
        """Whether a crop read as ``text`` with ``confidence`` is read again stretched."""
        return bool(self.stretches) and (not text or confidence < self.below_confidence)


def stretched(image: Image.Image, factor: float) -> Image.Image:
    """``image`` made ``factor`` times as wide (bilinear; the height is kept)."""
    width = max(1, round(image.width * factor))
    return image.resize((width, image.height), Image.Resampling.BILINEAR)


def best_of_views(log_probs: Sequence[np.ndarray], first: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The word (CTC class ids) with the highest CTC log-likelihood summed over the views'
    ``(T_v, C+1)`` log-probabilities, among each view's best path and ``first`` (the word
    already read, when given), and the index of a view whose best path it is (-1: only
    ``first``). Ties go to ``first``, then to the earlier view. An empty word is a candidate
    only when every one is empty: a view that reads nothing does not erase a word read."""
    candidates: list[tuple[int, ...]] = []
    if first is not None:
        candidates.append(tuple(int(c) for c in first))
    paths = [tuple(int(c) for c in ctc_greedy(lp)) for lp in log_probs]
    for path in paths:
        if path not in candidates:
            candidates.append(path)
    if any(candidates):
        candidates = [c for c in candidates if c]
    if len(candidates) == 1:
        word = candidates[0]
    else:
        words = [np.asarray(c, dtype=np.int64) for c in candidates]
        total = sum(ctc_log_likelihoods(lp, words) for lp in log_probs)
        word = candidates[int(np.argmax(total))]
    view = paths.index(word) if word in paths else -1
    return np.asarray(word, dtype=np.int64), view
