"""The text detector a bundle uses, and the settings fitted to it (manifest ``"detector"``).

The detector's ONNX graph is either a file of the bundle (``"file"``) or a file of an
installed package (``"package"`` + ``"file"``: PP-OCRv6's detector ships in the ``rapidocr``
wheel, Apache-2.0); either way its sha256 is checked before it is used. A bundle without a
``"detector"`` section (every bundle made before detection existed) gets the defaults of
:class:`DetectorSettings`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'clipllama[detect]'"

#: sha256 of ``rapidocr`` 3.10.0's ``models/PP-OCRv6_det_small.onnx``
DEFAULT_SHA256 = "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"
#: sha256 of ``rapidocr`` 3.10.0's ``models/PP-OCRv6_rec_small.onnx`` (the line reader)
LINE_READER_SHA256 = "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"


class DetectUnavailable(RuntimeError):
    """Text detection cannot run here: a missing extra or detector file (one line says why)."""


@dataclass(frozen=True)
class DetectorSettings:
    """The detector graph and every number fitted to it."""

    name: str = "PP-OCRv6_det_small"
    package: str | None = "rapidocr"
    package_version: str | None = "3.10.0"
    file: str = "models/PP-OCRv6_det_small.onnx"
    sha256: str = DEFAULT_SHA256
    license: str | None = "Apache-2.0"
    #: the photo is scaled so that its longest side is this many pixels (multiples of 32)
    max_side: int = 1280
    #: ... and its shortest at least this many (when the longest allows)
    min_side: int = 736
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    #: the graph reads BGR (PaddleOCR's training pipeline decodes with OpenCV)
    bgr: bool = True
    #: DB binarisation of the probability map
    threshold: float = 0.3
    #: a region is kept when its mean probability is at least this
    box_threshold: float = 0.5
    #: growth of the shrunk text kernel back to the text's extent (DB's unclip ratio)
    unclip_ratio: float = 1.6
    dilate: bool = True
    min_size: float = 3.0
    max_candidates: int = 1000
    #: the line reader that finds the spaces between words (``runtime.detect.words``), in
    #: the same package (or bundle) as the detector
    line_reader_file: str = "models/PP-OCRv6_rec_small.onnx"
    line_reader_sha256: str = LINE_READER_SHA256
    #: cut run-together words into two the shipped English word list knows, at a spacing
    #: of at least ``joint_gap`` character pitches (``runtime.detect.words.cut_token``)
    lexicon_cuts: bool = True
    joint_gap: float = 1.6
    #: margin added to each side of a word, in line heights (at most half the gap)
    word_margin: float = 0.15
    #: the LLM corrector's prompt holds the other words of the line (measured: docs/detection.md)
    llm_context: bool = False
    #: words read with a lower confidence are dropped
    min_confidence: float = 0.0

    def with_changes(self, **changes: Any) -> DetectorSettings:
        return replace(self, **changes)


def detector_settings(manifest: dict[str, Any] | None) -> DetectorSettings:
    """The settings of a manifest's ``"detector"`` section over the defaults; unknown keys
    are refused with a clear error (a typo must not silently fall back)."""
    raw = (manifest or {}).get("detector") or {}
    if not isinstance(raw, dict):
        raise ValueError("manifest 'detector' must be an object")
    known = {f.name for f in fields(DetectorSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"manifest 'detector': unknown keys {', '.join(unknown)}")
    values = {k: tuple(v) if k in ("mean", "std") else v for k, v in raw.items()}
    return DetectorSettings(**values)


def require_libraries() -> None:
    """Raise :class:`DetectUnavailable` when the ``detect`` extra's libraries are missing."""
    missing = [name for module, name in (("cv2", "opencv-python-headless"), ("pyclipper", "pyclipper"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise DetectUnavailable(f"text detection needs {' and '.join(missing)}: {INSTALL_HINT}")


def model_path(settings: DetectorSettings, bundle_root: Path | None, file: str | None = None,
               sha256: str | None = None) -> Path:
    """The detector graph's path (or ``file``'s, with ``sha256``: the line reader), its sha256
    checked; :class:`DetectUnavailable` when the package that carries it is not installed
    or the file is not the one named."""
    file = settings.file if file is None else file
    sha256 = settings.sha256 if sha256 is None else sha256
    if settings.package:
        spec = importlib.util.find_spec(settings.package)
        if spec is None or not spec.submodule_search_locations:
            raise DetectUnavailable(f"text detection needs the {settings.package} package (its "
                                    f"{settings.name} model): {INSTALL_HINT}")
        path = Path(next(iter(spec.submodule_search_locations))) / file
    else:
        if bundle_root is None:
            raise DetectUnavailable(f"detector file {file} is relative to a bundle and none was given")
        path = bundle_root / file
    if not path.is_file():
        raise DetectUnavailable(f"detector model {path} is missing ({settings.package or 'bundle'}"
                                f"{' ' + settings.package_version if settings.package_version else ''}); "
                                f"{INSTALL_HINT}")
    if sha256:
        actual = _sha256(str(path), path.stat().st_mtime_ns)
        if actual != sha256:
            raise DetectUnavailable(f"detector model {path} has sha256 {actual}, the bundle says "
                                    f"{sha256} (another {settings.package or 'file'} version?)")
    return path


@lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_available(settings: DetectorSettings | None = None) -> None:
    """Raise :class:`DetectUnavailable` (one line: what to install) unless detection can run
    with ``settings`` (default: the default detector). Imports nothing of the extra."""
    require_libraries()
    settings = settings or DetectorSettings()
    if settings.package:
        model_path(settings, None)
        model_path(settings, None, settings.line_reader_file, settings.line_reader_sha256)
