"""The recognizer: a bundle plus an optional LLM corrector, turning images into words.

Per batch (docs/bundle.md): load and preprocess (``runtime.preprocess``), ``image_encoder``,
``visual_decoder`` -> AR and refined logits, ``TextBridge`` BPE ids for both, one batched
``text_encoder`` call, ``cross_decoder``, softmax + ``CharCodec.decode`` (top-k), the
confidence gate and, for gated words, the LLM corrector. Every input gets one
:class:`ReadResult`; an input that cannot be read gets one with ``error`` set and the rest
of the batch is read as if it were not there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.backends import Backend, select_backend
from runtime.bundle import Bundle, load_bundle
from runtime.correction.contract import Correction, Corrector
from runtime.correction.gate import check_threshold, gate
from runtime.correction.settings import (
    LEXICON_ONLY,
    CorrectionSettings,
    is_lexicon_only,
    lexicon_only_problem,
    without_llm_note,
)
from runtime.ctc_reading import DECODE_MODES, ctc_prediction, ctc_predictions
from runtime.decoding import CharCodec, Prediction, ctc_rescored, softmax
from runtime.inputs import Sample, Source, array_to_image, source_name
from runtime.lm_fill import fill_all
from runtime.options import LLM_MODES, WITHOUT_LLM, RecognizerConfig, default_llm_missing
from runtime.preprocess import ImageError, load_image, pad_batch, preprocess, width_groups
from runtime.specialist import Specialist, check_specialist, open_specialist
from runtime.tokenizer import BPETokenizer, TextBridge
from runtime.views import VIEW_CHOICES, TurnSettings, ViewSettings, best_of_views, stretched, surety, turned

#: Stage names of :attr:`ReadResult.timings_ms`, in the order they run.
STAGES = ("preprocess", "image_encoder", "image_encoder_recheck", "visual_decoder", "tokenize", "text_encoder",
          "cross_decoder", "image_encoder_views", "image_encoder_specialist", "decode_gate", "llm")
DEFAULT_BATCH_SIZE = 32
#: :meth:`Recognizer.read` groups images of equal padded width within windows of this many
#: batches (a window's images are loaded at once)
GROUP_WINDOW = 8


@dataclass
class LLMInfo:
    """What the LLM corrector did with a gated word."""

    mode: str
    changed: bool = False
    #: candidates considered, best first: ``{"text", "score", ...}`` as the corrector reports them
    candidates: list[dict[str, Any]] = field(default_factory=list)
    #: why the corrector kept the vision answer without asking the model, as a decision
    #: (e.g. too many characters below the threshold); None when it decided nothing such
    decision: str | None = None
    #: why the vision answer stands when the corrector or its model failed (None: no failure)
    error: str | None = None


@dataclass
class ReadResult:
    """The reading of one input (or why it could not be read)."""

    source: str
    text: str | None = None
    #: word confidence: the product of :attr:`char_confidences`
    confidence: float | None = None
    char_confidences: list[float] = field(default_factory=list)
    #: the cross-modal decoder's word before any LLM correction
    vision_text: str | None = None
    vision_confidence: float | None = None
    #: True when some character fell below the threshold (the word went to the LLM, if any)
    gated: bool = False
    #: positions below the threshold
    masked: list[int] = field(default_factory=list)
    llm: LLMInfo | None = None
    #: milliseconds per stage (:data:`STAGES`); batch stages are divided evenly among the
    #: batch's images, ``llm`` is this word's own correction time (0 when not gated)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    label: str | None = None
    #: True when the confidence fell below the recognizer's ``min_confidence``: ``text`` is
    #: then empty (``vision_text`` and ``confidence`` still say what was read)
    low_confidence: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def llm_changed(self) -> bool:
        return bool(self.llm and self.llm.changed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.label is None:
            del data["label"]
        return data


class _Timer:
    """Accumulates wall time per stage."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + 1000.0 * (time.perf_counter() - start)


def _load(item: Source | Sample, name: str | None = None) -> Image.Image:
    """The RGB image of one input (``name``: how errors call encoded bytes)."""
    data = item.data if isinstance(item, Sample) else item
    if isinstance(data, np.ndarray):
        return array_to_image(data)
    if not isinstance(data, str | bytes | bytearray | Image.Image | Path) and not hasattr(data, "__fspath__"):
        raise ImageError(f"unsupported input type {type(data).__name__} (path, bytes, PIL image or array)")
    return load_image(data, name=name)


def make_corrector(llm: str | None, mode: str, threshold: float, lexicon: str | None = "default",
                   settings: CorrectionSettings | None = None) -> Corrector | None:
    """The corrector for ``llm``: ``None`` uses the embedded default model when it can run,
    else ranks candidates without a language model (``"lexicon"``), with a warning;
    ``"default"`` the embedded model; ``"lexicon"`` no language model (the rescore mode's
    candidates ranked by CTC likelihood and word frequency); ``"none"`` no correction; else a
    GGUF path. An LLM asked for explicitly that cannot be loaded raises ``RuntimeError``.
    ``lexicon``: a user's word list (searched before the shipped English one), ``"default"``
    or ``"none"``; an unreadable list raises ``ValueError``. ``settings``: the bundle's
    correction settings (``mode`` and ``threshold`` put over them; default: the defaults)."""
    if mode not in LLM_MODES:
        raise ValueError(f"unknown LLM mode {mode!r} (choose from {', '.join(LLM_MODES)})")
    if llm is not None and str(llm).strip().lower() == "none":
        return None
    try:
        from runtime.correction.corrector import LLMCorrector
    except ImportError as exc:  # a broken install of the correction side
        if llm is None:
            warnings.warn(f"LLM correction is off: {exc}", RuntimeWarning, stacklevel=3)
            return None
        raise RuntimeError(f"LLM correction is not available ({exc})") from exc
    if is_lexicon_only(llm):
        return LLMCorrector.from_spec(LEXICON_ONLY, mode=mode, threshold=threshold, lexicon=lexicon,
                                      settings=settings)
    missing = default_llm_missing() if llm is None else None
    if missing:
        return _without_llm(missing, mode, threshold, lexicon, settings)
    corrector = LLMCorrector.from_spec("default" if llm is None else str(llm), mode=mode, threshold=threshold,
                                       lexicon=lexicon, settings=settings)
    if not corrector.enabled:
        if llm is None:
            return _without_llm(str(corrector.unavailable), mode, threshold, lexicon, settings)
        raise RuntimeError(f"--llm {llm}: cannot be used ({corrector.unavailable}); {WITHOUT_LLM}")
    return corrector


def _without_llm(cause: str, mode: str, threshold: float, lexicon: str | None,
                 settings: CorrectionSettings | None) -> Corrector | None:
    """The default corrector when the default LLM cannot run (``cause``): candidates ranked
    without a language model where the mode and lexicon allow it (else none), with a warning."""
    from runtime.correction.corrector import LLMCorrector

    warnings.warn(without_llm_note(cause, mode, lexicon), RuntimeWarning, stacklevel=4)
    if lexicon_only_problem(mode, lexicon) is not None:
        return None
    return LLMCorrector.from_spec(LEXICON_ONLY, mode=mode, threshold=threshold, lexicon=lexicon, settings=settings)


def bundle_decode(bundle: Bundle) -> str:
    """The bundle's decode mode: its manifest's ``defaults.decode`` when it names one the
    bundle can read with, else ``full`` (bundles exported before the field existed)."""
    defaults = bundle.manifest.get("defaults")
    wanted = defaults.get("decode") if isinstance(defaults, dict) else None
    if wanted in DECODE_MODES and (wanted == "full" or bundle.decode.ctc_rescoring):
        return str(wanted)
    return "full"


def check_decode(bundle: Bundle, decode: str | None) -> str:
    """``decode`` (None: :func:`bundle_decode`) when the bundle can read that way; else
    ``ValueError`` saying why."""
    if decode is None:
        return bundle_decode(bundle)
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r} (choose from {', '.join(DECODE_MODES)})")
    if decode != "full" and not bundle.decode.ctc_rescoring:
        raise ValueError(f"--decode {decode} needs a bundle whose image encoder has a CTC head "
                         "(ctc_log_probs, e.g. the PP-OCR tower); this one reads with --decode full only")
    return decode


def check_views(bundle: Bundle, views: str | ViewSettings | None) -> ViewSettings | None:
    """The view settings ``views`` (None or ``auto``: the bundle's ``defaults.views``; ``off``:
    none; or settings given) reads with; ``ValueError`` for an unknown choice or a malformed
    manifest section. Only a bundle with a CTC head reads views."""
    if isinstance(views, ViewSettings):
        return views if bundle.decode.ctc_rescoring else None
    if views is not None and views not in VIEW_CHOICES:
        raise ValueError(f"unknown --views {views!r} (choose from {', '.join(VIEW_CHOICES)})")
    if views == "off" or not bundle.decode.ctc_rescoring:
        return None
    return ViewSettings.from_manifest(bundle.manifest)


class Recognizer:
    """Reads word images with a bundle's graphs, the gate and an optional LLM corrector."""

    def __init__(self, bundle: Bundle, backend: Backend, corrector: Corrector | None = None,
                 threshold: float | None = None, llm_mode: str = "rescore",
                 min_confidence: float | None = None, correction: CorrectionSettings | None = None,
                 decode: str | None = None, views: str | ViewSettings | None = None,
                 specialist: Specialist | None = None) -> None:
        self.bundle = bundle
        self.backend = backend
        self.corrector = corrector
        #: the correction settings (the bundle's unless given): the gap rule and joint
        #: rescoring weights the decoding uses too
        self.correction = correction or bundle.correction
        self.llm_mode = llm_mode
        self.threshold = check_threshold(bundle.threshold if threshold is None else threshold)
        self.codec = CharCodec(bundle.charset)
        self.tokenizer = BPETokenizer(bundle.tokenizer_path)
        self.bridge = TextBridge(self.codec, bundle.test_charset, self.tokenizer,
                                 bundle.decode.text_context_length)
        self.topk = max(1, bundle.decode.topk)
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be within [0, 1], not {min_confidence}")
        self.min_confidence = min_confidence
        self.decode = check_decode(bundle, decode)
        #: how doubtful crops are read again (:mod:`runtime.views`; None: one view)
        self.views = check_views(bundle, views)
        #: the fine-tuned tower that reads the crops the general one doubts
        #: (:mod:`runtime.specialist`; None: the bundle has none, or ``--specialist off``)
        self.specialist = specialist

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, backend: str = "auto", llm: str | None = None,
                    threshold: float | None = None, llm_mode: str = "rescore", precision: str | None = None,
                    threads: int | None = None, verify: bool = True, lexicon: str | None = "default",
                    min_confidence: float | None = None,
                    correction: CorrectionSettings | None = None, decode: str | None = None,
                    views: str | ViewSettings | None = None, specialist: str | None = None) -> Recognizer:
        """Load and check the bundle at ``path`` (None: the embedded default bundle), pick the
        backend (see :func:`~runtime.backends.select_backend`), set up the LLM (see
        :func:`make_corrector`). ``min_confidence``: words below it read as empty text, flagged
        :attr:`ReadResult.low_confidence` (None: off). ``correction``: correction settings
        (default: the bundle's manifest section). ``decode``: one of
        :data:`~runtime.ctc_reading.DECODE_MODES` (None: the bundle's, :func:`bundle_decode`).
        ``views``: ``auto`` (None) or ``off``, see :func:`check_views`; ``specialist`` likewise,
        see :func:`runtime.specialist.check_specialist`."""
        bundle = load_bundle(path, verify=verify)
        value = check_threshold(bundle.threshold if threshold is None else threshold)
        mode = check_decode(bundle, decode)
        check_views(bundle, views)
        check_specialist(bundle, specialist)
        settings = correction or bundle.correction
        corrector = make_corrector(llm, llm_mode, value, lexicon, settings)
        # ``full`` reads with the decoders alone: the specialist's session is not opened
        helper = open_specialist(bundle, specialist, threads) if mode != "full" else None
        return cls(bundle, select_backend(bundle, backend, precision, threads), corrector, value, llm_mode,
                   min_confidence, settings, decode, views, helper)

    @classmethod
    def from_config(cls, config: RecognizerConfig, num_cpus: float | None = None,
                    verify: bool = True) -> Recognizer:
        """:meth:`RecognizerConfig.build`: the options every entry point shares."""
        return config.build(num_cpus, verify=verify)

    @property
    def llm_enabled(self) -> bool:
        """Whether a language model corrects doubtful words."""
        return self.correction_kind == "llm"

    @property
    def correction_kind(self) -> str:
        """What corrects doubtful words: ``"llm"``, ``"lexicon"`` (candidates ranked without
        a language model, ``--llm lexicon``) or ``"none"``."""
        if self.corrector is None:
            return "none"
        return LEXICON_ONLY if getattr(self.corrector, "without_llm", False) else "llm"

    def close(self) -> None:
        self.backend.close()
        if self.specialist is not None:
            self.specialist.close()

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def read(self, images: Sequence[Source | Sample] | Source | Sample,
             batch_size: int = DEFAULT_BATCH_SIZE) -> list[ReadResult]:
        """One :class:`ReadResult` per input, in order. Inputs: paths, encoded bytes,
        PIL images, numpy arrays (HxW[xC]) or :class:`~runtime.inputs.Sample`.

        Images are batched (at most ``batch_size``) with others of the same padded input
        width (:func:`~runtime.preprocess.width_groups`, over windows of
        ``GROUP_WINDOW * batch_size`` inputs), so each word reads as it would alone."""
        if isinstance(images, str | bytes | bytearray | Image.Image | np.ndarray | Sample | Path):
            images = [images]
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        items = list(images)
        results: list[ReadResult] = []
        window = batch_size * GROUP_WINDOW
        for start in range(0, len(items), window):
            results.extend(self._read_window(items[start:start + window], start, batch_size))
        return results

    def read_photos(self, photos: Sequence[Source | Sample] | Source | Sample,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> list[Any]:
        """Whole photos: the words of each (``runtime.detect.photo.PhotoResult``: polygons,
        texts, confidences, lines, reading order), detected with the bundle's text detector.
        Needs the ``detect`` extra (``runtime.detect.DetectUnavailable`` says what is missing);
        a photo that cannot be read gets its error, one with no text an empty word list."""
        from runtime.detect.photo import read_photos

        return read_photos(self, photos, batch_size)

    def _read_window(self, items: list[Source | Sample], offset: int, batch_size: int) -> list[ReadResult]:
        """Load ``items``, then read them in batches of equal padded width."""
        results = [ReadResult(source_name(item, offset + i),
                              label=item.label if isinstance(item, Sample) else None)
                   for i, item in enumerate(items)]
        loaded: list[int] = []
        pictures: list[Image.Image] = []
        load_ms: dict[int, float] = {}
        for i, item in enumerate(items):
            start = time.perf_counter()
            try:
                pictures.append(_load(item, results[i].source))
                loaded.append(i)
            except ImageError as exc:
                results[i].error = str(exc)
            except Exception as exc:  # a reader bug must not lose the batch
                results[i].error = f"cannot read input ({type(exc).__name__}: {exc})"
            load_ms[i] = 1000.0 * (time.perf_counter() - start)
        sizes = [picture.size for picture in pictures]
        for batch in width_groups(sizes, self.bundle.preprocessing, batch_size):
            self._read_batch(results, [loaded[k] for k in batch], [pictures[k] for k in batch], load_ms)
        return results

    def _read_batch(self, results: list[ReadResult], good: list[int], pictures: list[Image.Image],
                    load_ms: dict[int, float]) -> None:
        """Read ``pictures`` as one batch into ``results[good[k]]``."""
        timer = _Timer()
        by_index = dict(zip(good, pictures))
        with timer("preprocess"):
            batch, good = self._preprocess(pictures, good, results)
        if batch is None:
            return
        pictures = [by_index[i] for i in good]  # without any that failed to preprocess
        try:
            predictions = self._decode(batch, timer)
            if self.views is not None:
                predictions = self._read_views(pictures, predictions, self.views, timer)
            if self.decode != "ctc" and self.corrector is None and self.correction.lm_fill.enabled:
                with timer("decode_gate"):  # without a corrector, the language side fills CTC gaps
                    predictions = fill_all(predictions, self.correction.lm_fill, rule=self.correction.gaps)
        except Exception as exc:  # backend failure: every image of this batch reports it
            for i in good:
                results[i].error = f"inference failed ({type(exc).__name__}: {exc})"
            return
        for i, prediction in zip(good, predictions):
            self._fill(results[i], prediction)
        with timer("llm"):
            self._correct([results[i] for i in good], predictions)
        if self.min_confidence is not None:
            for i in good:
                if (results[i].confidence or 0.0) < self.min_confidence:
                    results[i].low_confidence = True
                    results[i].text = ""
        share = {stage: timer.ms.get(stage, 0.0) / len(good) for stage in STAGES if stage != "llm"}
        gated = [i for i in good if results[i].gated] if self.corrector is not None else []
        llm_share = timer.ms.get("llm", 0.0) / len(gated) if gated else 0.0
        for i in good:
            own = results[i].timings_ms.get("llm", llm_share if i in gated else 0.0)
            results[i].timings_ms = {**share, "preprocess": share["preprocess"] + load_ms.get(i, 0.0), "llm": own}

    def _preprocess(self, pictures: list[Image.Image], good: list[int],
                    results: list[ReadResult]) -> tuple[np.ndarray | None, list[int]]:
        """The batch tensor; should one picture fail, each is tried alone and only it fails."""
        if not pictures:
            return None, good
        try:
            return preprocess(pictures, self.bundle.preprocessing), good
        except Exception:
            rows, kept = [], []
            for i, picture in zip(good, pictures):
                try:
                    rows.append(preprocess([picture], self.bundle.preprocessing)[0])
                    kept.append(i)
                except Exception as exc:
                    results[i].error = f"cannot preprocess input ({type(exc).__name__}: {exc})"
            return (pad_batch(rows, self.bundle.preprocessing) if rows else None), kept

    def _decode(self, images: np.ndarray, timer: _Timer) -> list[Prediction]:
        run = self.backend.run
        with timer("image_encoder"):
            encoded = run("image_encoder", {"images": images})
        recheck = getattr(self.backend, "below_confidence", None)
        if self.decode == "full" and recheck is None:
            return self._decoders(encoded, timer)
        with timer("decode_gate"):
            predictions = ctc_predictions(self.codec, encoded["ctc_log_probs"], topk=self.topk,
                                          gap_rule=self.correction.gaps)
        if recheck is not None:
            predictions = self._recheck(images, encoded, predictions, recheck, timer)
        if self.decode == "full":
            return self._decoders(encoded, timer)
        special = self._consult_specialist(images, predictions, timer) if self.specialist is not None else set()
        if self.decode == "cascade":  # the decoders for the words the gate does not trust,
            # and for crops where CTC read nothing (a blank crop, or text too faint for it);
            # not for the specialist's words (the decoders read the general tower's features)
            fill = self.correction.joint.fill_gaps  # a gap is where the decoders' characters are wanted
            unsure = [i for i, p in enumerate(predictions) if i not in special
                      and (not p.text or (fill and p.gaps) or gate(p, self.threshold).needs_llm)]
            if unsure:
                subset = {name: value[unsure] for name, value in encoded.items()}
                for i, prediction in zip(unsure, self._decoders(subset, timer)):
                    predictions[i] = prediction
        return predictions

    def _recheck(self, images: np.ndarray, encoded: dict[str, np.ndarray], predictions: list[Prediction],
                 below: float, timer: _Timer) -> list[Prediction]:
        """``--precision int8+fp32``: the crops whose (int8) CTC reading is empty or less
        confident than ``below`` are encoded again in fp32; their rows of ``encoded`` and
        their predictions are replaced."""
        again = [i for i, p in enumerate(predictions) if not p.text or p.confidence < below]
        if not again:
            return predictions
        with timer("image_encoder_recheck"):
            redone = self.backend.run_reference("image_encoder", {"images": images[again]})
        for name, value in redone.items():
            if name in encoded:
                encoded[name][again] = value
        with timer("decode_gate"):
            fresh = ctc_predictions(self.codec, encoded["ctc_log_probs"][again], topk=self.topk,
                                    gap_rule=self.correction.gaps)
        for i, prediction in zip(again, fresh):
            predictions[i] = prediction
        return predictions

    def _consult_specialist(self, images: np.ndarray, predictions: list[Prediction], timer: _Timer) -> set[int]:
        """The crops the general tower doubts are read by the bundle's specialist too; its
        reading replaces the general one where :meth:`SpecialistSettings.prefers` says so
        (``predictions`` in place). Returns the indices replaced."""
        assert self.specialist is not None
        settings = self.specialist.settings
        asked = [i for i, p in enumerate(predictions) if settings.wants(p.text, p.confidence)]
        if not asked:
            return set()
        with timer("image_encoder_specialist"):
            rows = self.specialist.log_probs(images[asked])
        replaced = set()
        with timer("decode_gate"):
            for i, row in zip(asked, rows):
                read = ctc_prediction(self.codec, row, topk=self.topk, gap_rule=self.correction.gaps)
                if settings.prefers((predictions[i].text, predictions[i].confidence), (read.text, read.confidence)):
                    predictions[i] = read
                    replaced.add(i)
        return replaced

    def _read_views(self, pictures: list[Image.Image], predictions: list[Prediction], settings: ViewSettings,
                    timer: _Timer) -> list[Prediction]:
        """Doubtful tall crops are read turned first (:meth:`_read_turned`). Then the crops whose
        reading is doubtful (:meth:`ViewSettings.wants`) are encoded again, stretched by each
        factor (in fp32 where the backend has a reference); the word with the highest CTC
        likelihood over all views replaces the reading when it differs."""
        if settings.turns is not None:
            pictures = self._read_turned(pictures, predictions, settings.turns, timer)
        again = [i for i, p in enumerate(predictions)
                 if p.ctc_log_probs is not None and settings.wants(p.text, p.confidence)]
        if not again:
            return predictions
        seen: dict[int, list[np.ndarray]] = {i: [predictions[i].ctc_log_probs] for i in again}
        with timer("image_encoder_views"):
            for factor in settings.stretches:
                for i, row in zip(again, self._view_log_probs([stretched(pictures[i], factor) for i in again])):
                    seen[i].append(row)
        with timer("decode_gate"):
            for i in again:
                read = self.codec.ids(predictions[i].text)
                word, view = best_of_views(seen[i], first=read)
                if view >= 0 and not np.array_equal(word, read):
                    predictions[i] = ctc_prediction(self.codec, seen[i][view], topk=self.topk,
                                                    gap_rule=self.correction.gaps)
        return predictions

    def _view_log_probs(self, views: list[Image.Image]) -> list[np.ndarray]:
        """The CTC log-probabilities of each extra view, in order, encoded in batches of equal
        padded width (in fp32 where the backend has a reference, as the rechecked crops are)."""
        spec = self.bundle.preprocessing
        run = getattr(self.backend, "run_reference", self.backend.run)
        out: list[np.ndarray] = [np.empty(0)] * len(views)
        for group in width_groups([view.size for view in views], spec, len(views)):
            rows = run("image_encoder", {"images": preprocess([views[k] for k in group], spec)})["ctc_log_probs"]
            for k, row in zip(group, rows):
                out[k] = row
        return out

    def _read_turned(self, pictures: list[Image.Image], predictions: list[Prediction], turns: TurnSettings,
                     timer: _Timer) -> list[Image.Image]:
        """The doubtful crops at least ``turns.min_aspect`` times as tall as wide are encoded
        turned a quarter each way; the surer turned reading replaces the upright one
        (:meth:`TurnSettings.prefers`, ``predictions`` in place). Returns the pictures with
        each such crop turned, for the stretched views."""
        again = [i for i, p in enumerate(predictions)
                 if p.ctc_log_probs is not None and turns.wants(pictures[i].size, p.text, p.confidence)]
        if not again:
            return pictures
        read: dict[int, list[tuple[Image.Image, np.ndarray]]] = {i: [] for i in again}
        with timer("image_encoder_views"):
            for clockwise in (False, True):
                views = [turned(pictures[i], clockwise) for i in again]
                for i, view, row in zip(again, views, self._view_log_probs(views)):
                    read[i].append((view, row))
        pictures = list(pictures)
        with timer("decode_gate"):
            for i in again:
                options = [(view, ctc_prediction(self.codec, row, topk=self.topk, gap_rule=self.correction.gaps))
                           for view, row in read[i]]
                view, best = max(options, key=lambda o: surety(o[1].text, o[1].confidence))
                if turns.prefers((predictions[i].text, predictions[i].confidence), (best.text, best.confidence)):
                    predictions[i], pictures[i] = best, view
        return pictures

    def _decoders(self, encoded: dict[str, np.ndarray], timer: _Timer) -> list[Prediction]:
        """The method's words from the image encoder's outputs: both decoders, CTC rescoring."""
        run, features = self.backend.run, encoded["image_features"]
        n = len(features)
        with timer("visual_decoder"):
            visual = run("visual_decoder", {"image_features": features})
        with timer("tokenize"):
            ids = np.concatenate([self.bridge(visual["ar_logits"].argmax(-1)),
                                  self.bridge(visual["refined_logits"].argmax(-1))])
        with timer("text_encoder"):
            text_features = run("text_encoder", {"text_ids": ids})["text_features"]
        with timer("cross_decoder"):
            cross = run("cross_decoder", {"image_features": features, "text_features_ar": text_features[:n],
                                          "text_features_refined": text_features[n:]})
        with timer("decode_gate"):
            probs = softmax(cross["refined_logits"])
            if self.bundle.decode.ctc_rescoring:
                joint = self.correction.joint
                return ctc_rescored(self.codec, probs, encoded["ctc_log_probs"], topk=self.topk, ctc_weight=joint.ctc,
                                    decoder_weight=joint.decoder, gap_rule=self.correction.gaps,
                                    fill_gaps=joint.fill_gaps, fill_slack=joint.fill_slack)
            return self.codec.decode(probs, topk=self.topk)

    def _fill(self, result: ReadResult, prediction: Prediction) -> None:
        result.text = result.vision_text = prediction.text
        result.char_confidences = [float(p) for p in prediction.char_probs]
        result.confidence = result.vision_confidence = prediction.confidence
        if self.corrector is None:  # a corrector gates the words itself (_correct)
            decision = gate(prediction, self.threshold)
            result.gated = decision.needs_llm
            result.masked = list(decision.masked)

    def _correct(self, results: list[ReadResult], predictions: list[Prediction]) -> None:
        """Hand every word to the corrector, which gates them; on any failure the vision
        answer stands."""
        if self.corrector is None or not results:
            return
        try:
            corrections = self.corrector.correct(predictions, self.codec.charset)
            if len(corrections) != len(results):
                raise RuntimeError(f"{len(corrections)} corrections for {len(results)} words")
        except Exception as exc:  # the corrector should not raise; if it does, vision stands
            for result, prediction in zip(results, predictions):
                decision = gate(prediction, self.threshold)  # only to say which words it concerned
                result.gated, result.masked = decision.needs_llm, list(decision.masked)
                if result.gated:
                    result.llm = LLMInfo(self.llm_mode, error=f"{type(exc).__name__}: {exc}")
            return
        for result, prediction, correction in zip(results, predictions, corrections):
            result.masked = list(correction.low_confidence)
            result.gated = correction.gated
            if correction.gated:
                apply_correction(result, prediction, correction, self.llm_mode, self.codec.charset)


def apply_correction(result: ReadResult, prediction: Prediction, correction: Correction, mode: str,
                     charset: str) -> None:
    """Record a corrector's answer on ``result``. An answer that is empty, outside the
    charset or of another length than the vision answer is refused (the vision answer stands).
    A corrector may lengthen the word by the characters it says it inserted
    (``correction.inserted``: a decoder that skipped covered characters).
    The per-character confidences of a changed word are the decoder's probabilities of
    the characters now chosen (from its top-k; 0 where not among them or inserted)."""
    text = correction.text
    info = LLMInfo(correction.mode or mode, candidates=[c.to_dict() for c in correction.candidates],
                   decision=correction.decision, error="; ".join(correction.warnings) or None)
    result.llm = info
    result.timings_ms["llm"] = 1000.0 * float(correction.time_s)
    vision = prediction.text
    if text == vision:
        return
    inserted = max(0, correction.inserted)
    if (not text or not len(vision) <= len(text) <= len(vision) + inserted
            or any(c not in charset for c in text)):
        info.error = f"corrector answer {text!r} refused (empty, other length or outside the charset)"
        return
    info.changed = True
    result.text = text
    probs = []
    if len(text) == len(vision):
        for i, (old, new) in enumerate(zip(vision, text)):
            if old == new:
                probs.append(float(prediction.char_probs[i]))
            else:
                top = dict(prediction.topk[i]) if i < len(prediction.topk) else {}
                probs.append(float(top.get(new, 0.0)))
    else:  # characters the decoder skipped were inserted: they get 0, the others keep theirs
        i = 0
        for new in text:
            if i < len(vision) and vision[i] == new:
                probs.append(float(prediction.char_probs[i]))
                i += 1
            else:
                probs.append(0.0)
    result.char_confidences = probs
    result.confidence = float(np.prod(probs)) if probs else 1.0
