"""A fine-tuned tower that reads the crops the general one doubts (``--specialist``).

``training.finetune`` teaches the PP-OCR tower a user's domain, and the tower then reads
general text worse: it forgets. Mixing weights (``original + alpha * (trained - original)``)
trades one against the other. A bundle may instead carry the trained tower as a second
image encoder, the *specialist* (graph ``specialist_encoder``: images in, CTC
log-probabilities out): the general tower reads every crop, and a crop it reads as nothing or
less confidently than ``below_confidence`` is read by the specialist as well; the
specialist's reading replaces the general one when it is surer by more than ``margin``. What
the general tower reads with confidence is never touched, so it is not forgotten. The
settings are fitted on the fine-tune's validation and keep sets and travel in the manifest
as ``defaults.specialist``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from runtime.views import surer

#: ``--specialist``: ``auto`` consults the bundle's specialist when it has one, ``off`` never;
#: a number P in (0, 1] consults it on the crops read less confidently than P (the bundle's
#: margin kept), trading the domain against the general reading without training again
SPECIALIST_CHOICES = ("auto", "off")
#: the manifest key (under ``defaults``) and the graph's name (under ``graphs.fp32``)
MANIFEST_KEY = "specialist"
GRAPH_NAME = "specialist_encoder"


@dataclass(frozen=True)
class SpecialistSettings:
    """Which crops the specialist reads (read as nothing or less confidently than
    ``below_confidence`` by the general tower) and when its reading wins (surer by more than
    ``margin``)."""

    below_confidence: float
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.below_confidence <= 1.0:
            raise ValueError(f"specialist: below_confidence must be within (0, 1], not {self.below_confidence}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"specialist: margin must be within [0, 1), not {self.margin}")

    def to_dict(self) -> dict[str, Any]:
        return {"below_confidence": self.below_confidence, "margin": self.margin}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecialistSettings:
        return cls(float(data["below_confidence"]), float(data.get("margin", 0.0)))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> SpecialistSettings | None:
        """The manifest's ``defaults.specialist`` (None without one); ``ValueError`` when malformed."""
        section = (manifest.get("defaults") or {}).get(MANIFEST_KEY)
        if section is None:
            return None
        try:
            return cls.from_dict(section)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"manifest defaults.{MANIFEST_KEY} is malformed ({exc})") from None

    def wants(self, text: str, confidence: float) -> bool:
        """Whether the general tower's reading is doubtful enough to ask the specialist."""
        return not text or confidence < self.below_confidence

    def prefers(self, general: tuple[str, float], special: tuple[str, float]) -> bool:
        """Whether the specialist's reading (text, confidence) replaces the general one."""
        return surer(special, general, self.margin)

    def choose(self, general: tuple[str, float], special: tuple[str, float] | None) -> str:
        """The text read, given the general reading and the specialist's (None: not asked)."""
        if special is not None and self.wants(*general) and self.prefers(general, special):
            return special[0]
        return general[0]


class Specialist:
    """A bundle's specialist: its settings and the ``specialist_encoder`` graph in an fp32
    onnxruntime session (it reads the few doubtful crops; the general graphs keep their backend)."""

    def __init__(self, settings: SpecialistSettings, backend: Any) -> None:
        self.settings = settings
        self.backend = backend

    def log_probs(self, images: Any) -> Any:
        """``(B, T, C+1)`` CTC log-probabilities of a preprocessed batch."""
        return self.backend.run(GRAPH_NAME, {"images": images})["ctc_log_probs"]

    def close(self) -> None:
        self.backend.close()


def threshold_of(choice: str | float | None) -> float | None:
    """The threshold a ``--specialist`` value names (None: ``auto`` or ``off``); ``ValueError``
    for anything else."""
    if choice is None or choice in SPECIALIST_CHOICES:
        return None
    try:
        value = float(choice)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"unknown --specialist {choice!r} (choose from {', '.join(SPECIALIST_CHOICES)}, "
                         "or a confidence in (0, 1])")
    return value


def check_specialist(bundle: Any, choice: str | float | None) -> SpecialistSettings | None:
    """The settings the recognizer consults the specialist with (None: ``off``, or the bundle
    has none; a threshold replaces the bundle's); ``ValueError`` for an unknown choice, a
    malformed section, settings without the graph, or a threshold for a bundle without one."""
    below = threshold_of(choice)
    if choice == "off":
        return None
    settings = SpecialistSettings.from_manifest(bundle.manifest)
    if settings is not None and GRAPH_NAME not in bundle.graphs.get("fp32", {}):
        raise ValueError(f"{bundle.root}: manifest defaults.{MANIFEST_KEY} without an fp32 {GRAPH_NAME} graph")
    if below is not None:
        if settings is None:
            raise ValueError(f"--specialist {choice}: {bundle.root} has no specialist (training.finetune writes one)")
        settings = SpecialistSettings(below, settings.margin)
    return settings


def open_specialist(bundle: Any, choice: str | None, threads: int | None = None) -> Specialist | None:
    """The bundle's specialist ready to read (None: ``off``, or the bundle has none)."""
    settings = check_specialist(bundle, choice)
    if settings is None:
        return None
    from runtime.backends import OrtBackend

    return Specialist(settings, OrtBackend(bundle, "fp32", threads=threads, graphs=(GRAPH_NAME,)))
