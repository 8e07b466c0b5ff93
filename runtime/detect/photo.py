"""Whole photos: detection -> lines -> words -> rectified crops -> the recognizer.

Every photo gets one :class:`PhotoResult`: its words (polygon in photo pixels, text,
confidence, line and reading order) or why it could not be read. A photo with no text has
an empty word list. The word crops of a photo are read with :meth:`Recognizer.read` (batched
by padded width, gated and corrected as any crop).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.detect.geometry import VERTICAL_RATIO, polygon_list, quad_size, reading_order, rectify, sub_quad
from runtime.detect.settings import DetectorSettings, detector_settings, model_path, require_libraries
from runtime.inputs import Sample, Source, array_to_image, source_name
from runtime.preprocess import ImageError, load_image

if TYPE_CHECKING:
    from runtime.detect.detector import Detector
    from runtime.detect.words import LineReader
    from runtime.recognizer import ReadResult, Recognizer


@dataclass
class PhotoStages:
    """The models in front of the recognizer: the line detector and the line reader that
    finds the spaces between words."""

    detector: Detector
    line_reader: LineReader
    #: words known to :func:`runtime.detect.words.cut_token` (None: no lexicon cuts)
    lexicon: Any | None = None


@dataclass
class PhotoWord:
    """One word of a photo."""

    text: str
    #: four corners in photo pixels, clockwise from the text's top-left
    polygon: list[list[float]]
    confidence: float
    #: index of its text line, in reading order
    line: int
    #: index of the word in the photo's reading order
    order: int
    vision_text: str = ""
    gated: bool = False
    llm_changed: bool = False
    #: the detector's mean text probability over the line
    line_score: float = 0.0


@dataclass
class PhotoResult:
    """The words of one photo (or why it could not be read)."""

    source: str
    words: list[PhotoWord] = field(default_factory=list)
    width: int = 0
    height: int = 0
    #: milliseconds: load, detect, split (lines into words), recognize (crops, gate, LLM)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_photo(item: Source | Sample) -> Image.Image:
    """An RGB photo from a path, bytes, PIL image, array or sample, with the runtime's guards
    (``runtime.preprocess.load_image``: size limit, truncation, modes)."""
    data = item.data if isinstance(item, Sample) else item
    if isinstance(data, np.ndarray):
        return array_to_image(data).convert("RGB")
    if not isinstance(data, str | bytes | bytearray | Image.Image | Path) and not hasattr(data, "__fspath__"):
        raise ImageError(f"unsupported input type {type(data).__name__} (path, bytes, PIL image or array)")
    return load_image(data)


def stages_for(recognizer: Recognizer) -> PhotoStages:
    """The recognizer's detector and line reader, made on first use from its bundle's settings."""
    stages = getattr(recognizer, "_photo_stages", None)
    if stages is None:
        require_libraries()
        from runtime.detect.detector import Detector
        from runtime.detect.words import LineReader

        settings = detector_settings(recognizer.bundle.manifest)
        providers = _providers(recognizer)
        line_reader = LineReader(model_path(settings, recognizer.bundle.root, settings.line_reader_file,
                                            settings.line_reader_sha256), providers)
        lexicon = None
        if settings.lexicon_cuts:
            from runtime.correction.lexicon import Lexicon

            lexicon = Lexicon.default()
        stages = PhotoStages(Detector(settings, recognizer.bundle.root, providers=providers), line_reader, lexicon)
        recognizer._photo_stages = stages  # type: ignore[attr-defined]
    return stages


def _providers(recognizer: Recognizer) -> list[str]:
    name = str(getattr(recognizer.backend, "name", ""))
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if ("cuda" in name or "trt" in name) else \
        ["CPUExecutionProvider"]


def read_photos(recognizer: Recognizer, photos: Sequence[Source | Sample] | Source | Sample,
                batch_size: int = 32, settings: DetectorSettings | None = None) -> list[PhotoResult]:
    """One :class:`PhotoResult` per photo, in order; a photo that cannot be read gets its
    error and the others are read. ``settings`` overrides the bundle's detector settings."""
    if isinstance(photos, str | bytes | bytearray | Image.Image | np.ndarray | Sample | Path):
        photos = [photos]
    stages = stages_for(recognizer)
    if settings is not None:
        stages.detector.settings = settings
    return [_read_one(recognizer, stages, item, source_name(item, i), batch_size)
            for i, item in enumerate(photos)]


def _read_one(recognizer: Recognizer, stages: PhotoStages, item: Source | Sample, name: str,
              batch_size: int) -> PhotoResult:
    result = PhotoResult(name)
    clock = time.perf_counter()
    try:
        photo = np.asarray(load_photo(item))
    except ImageError as exc:
        result.error = str(exc)
        return result
    except Exception as exc:  # a reader bug must not lose the run
        result.error = f"cannot read photo ({type(exc).__name__}: {exc})"
        return result
    result.height, result.width = photo.shape[:2]
    timings = result.timings_ms
    timings["load"] = 1000.0 * (time.perf_counter() - clock)
    try:
        _detect_and_read(recognizer, stages, photo, result, batch_size)
    except Exception as exc:  # an inference failure: this photo reports it, the run goes on
        result.words = []
        result.error = f"reading failed ({type(exc).__name__}: {exc})"
    timings["total"] = 1000.0 * (time.perf_counter() - clock)
    return result


def _detect_and_read(recognizer: Recognizer, stages: PhotoStages, photo: np.ndarray, result: PhotoResult,
                     batch_size: int) -> None:
    from runtime.detect.words import split_words

    settings = stages.detector.settings
    timings = result.timings_ms
    clock = time.perf_counter()
    lines = stages.detector(photo)
    timings["detect"] = 1000.0 * (time.perf_counter() - clock)
    if not lines:
        return
    clock = time.perf_counter()
    rows = reading_order([line.quad for line in lines])
    ordered = [lines[i] for row in rows for i in row]
    crops, backs = [], []
    for line in ordered:
        quad = line.quad
        width, height = quad_size(quad)
        if height > VERTICAL_RATIO * width:  # vertical text: read along the long side
            quad = np.roll(quad, 1, axis=0)
        crop, back = rectify(photo, quad)
        crops.append(crop)
        backs.append(back)
    characters = stages.line_reader(crops)
    pieces: list[np.ndarray] = []
    owners: list[tuple[int, int]] = []  # (line, word within line) per piece
    spans_per_line = []
    for k, (crop, chars) in enumerate(zip(crops, characters)):
        spans = split_words(chars, settings.word_margin, stages.lexicon if settings.lexicon_cuts else None,
                            settings.joint_gap)
        scale = crop.shape[1] / max(chars.width, 1.0)
        spans_per_line.append((spans, scale))
        for j, span in enumerate(spans):
            for x0, x1 in span.pieces:
                a, b = int(np.floor(x0 * scale)), int(np.ceil(x1 * scale))
                a, b = max(0, min(a, crop.shape[1] - 1)), max(1, min(b, crop.shape[1]))
                pieces.append(np.ascontiguousarray(crop[:, a:max(b, a + 1)]))
                owners.append((k, j))
    timings["split"] = 1000.0 * (time.perf_counter() - clock)
    clock = time.perf_counter()
    if settings.llm_context and recognizer.corrector is not None:
        readings = _read_with_context(recognizer, pieces, owners, spans_per_line, batch_size)
    else:
        readings = recognizer.read(pieces, batch_size=batch_size)
    timings["recognize"] = 1000.0 * (time.perf_counter() - clock)
    by_word: dict[tuple[int, int], list[ReadResult]] = {}
    for owner, reading in zip(owners, readings):
        by_word.setdefault(owner, []).append(reading)
    order = 0
    for k, (spans, scale) in enumerate(spans_per_line):
        height = crops[k].shape[0]
        for j, span in enumerate(spans):
            parts = [r for r in by_word.get((k, j), []) if r.ok and r.text]
            if not parts:
                continue
            text = "".join(r.text or "" for r in parts)
            confidence = float(np.prod([r.confidence or 0.0 for r in parts]))
            if confidence < settings.min_confidence:
                continue
            quad = sub_quad(backs[k], span.x0 * scale, span.x1 * scale, height)
            result.words.append(PhotoWord(
                text=text, polygon=polygon_list(quad), confidence=round(confidence, 6), line=k, order=order,
                vision_text="".join(r.vision_text or "" for r in parts), gated=any(r.gated for r in parts),
                llm_changed=any(r.llm_changed for r in parts), line_score=round(ordered[k].score, 4)))
            order += 1


def context_prompt(words: Sequence[str], index: int, prefix: str, suffix: str) -> tuple[str, str]:
    """The corrector's prompt around word ``index`` of a line: the words before it end the
    prefix, the words after it start the suffix (``prefix + candidate + suffix``)."""
    before, after = " ".join(words[:index]), " ".join(words[index + 1:])
    return prefix + (before + " " if before else ""), (" " + after if after else "") + suffix


def _read_with_context(recognizer: Recognizer, pieces: list[np.ndarray], owners: list[tuple[int, int]],
                       spans_per_line: list[Any], batch_size: int) -> list[ReadResult]:
    """Read each word with a corrector whose prompt holds the other words of its line (as the
    line reader read them); words alone on their line are read as usual, in one batch."""
    base = recognizer.corrector
    readings: list[ReadResult | None] = [None] * len(pieces)
    alone = [i for i, (k, _) in enumerate(owners) if len(spans_per_line[k][0]) < 2]
    for i, reading in zip(alone, recognizer.read([pieces[i] for i in alone], batch_size=batch_size)):
        readings[i] = reading
    try:
        for i, (k, j) in enumerate(owners):
            if readings[i] is not None:
                continue
            words = [span.line_text for span in spans_per_line[k][0]]
            llm = base.settings.llm
            prefix, suffix = context_prompt(words, j, llm.rescore_prefix, llm.rescore_suffix)
            recognizer.corrector = base.with_settings(rescore_prefix=prefix, rescore_suffix=suffix)
            readings[i] = recognizer.read([pieces[i]], batch_size=batch_size)[0]
    finally:
        recognizer.corrector = base
    return [r for r in readings if r is not None]
