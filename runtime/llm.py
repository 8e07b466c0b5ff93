"""The LLM corrector: a re-export of :mod:`runtime.correction` under its first name
(benchmarks and tests import ``Corrector``, ``Correction`` and ``CorrectorSettings`` from here).

``Corrector`` here is the implementation (:class:`runtime.correction.corrector.LLMCorrector`);
the recognizer's protocol is :class:`runtime.correction.contract.Corrector`.
"""

from __future__ import annotations

from typing import Any

from runtime.correction.contract import Candidate, Correction
from runtime.correction.corrector import LLMCorrector, keeps_trusted
from runtime.correction.settings import CorrectionSettings

__all__ = ["MODES", "Candidate", "Correction", "Corrector", "CorrectorSettings", "keeps_trusted"]

#: The correction modes.
MODES = ("rescore", "fill")
Corrector = LLMCorrector


def CorrectorSettings(**flat: Any) -> CorrectionSettings:  # noqa: N802 - the first settings class's name
    """:class:`CorrectionSettings` from the flat names of the first settings class
    (:data:`runtime.correction.settings.FLAT_NAMES`)."""
    return CorrectionSettings().with_flat(**flat)
