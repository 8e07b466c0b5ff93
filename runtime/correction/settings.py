"""The correction's settings: nested, typed, validated once, and carried by a bundle.

A bundle's manifest (schema 2, docs/bundle.md) holds them in its ``correction`` section
(:meth:`CorrectionSettings.to_dict`); a schema-1 bundle, which has none, gets today's values
(the defaults below). ``--correction-config FILE`` (JSON in the same shape, any subset)
overrides a bundle's section (:meth:`CorrectionSettings.merged`). The values were chosen by
``python -m benchmarks.correction tune`` on validation data carved from the training crops
(docs/correction.md), never on the test sets.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

#: The correction modes: rank candidates (``rescore``) or let the LLM write the word (``fill``).
Mode = Literal["rescore", "fill"]
#: The modes, as a tuple (the CLI's choices).
MODES: tuple[str, ...] = get_args(Mode)

#: How a candidate's visual term is measured: the tower's CTC likelihood or the decoder's top-k.
Visual = Literal["ctc", "decoder"]
#: Where extra characters may go: between any two characters, or only at CTC gaps.
InsertAt = Literal["anywhere", "gaps"]
#: What a masked position may hold in the fill mode.
FillSlots = Literal["alnum", "charset", "topk"]

#: The ``--llm`` value (``LLMCorrector.from_spec`` spec) of the correction without a language
#: model: the rescore mode's candidates ranked without the LLM's term.
LEXICON_ONLY = "lexicon"


def is_lexicon_only(spec: object) -> bool:
    """Whether ``spec`` (an ``--llm`` value) asks for the correction without a language model."""
    return isinstance(spec, str) and spec.strip().lower() == LEXICON_ONLY


def lexicon_only_problem(mode: str, lexicon: object) -> str | None:
    """Why the correction without a language model cannot run with the LLM mode ``mode`` and
    the ``--lexicon`` value ``lexicon``, in one line (None: it can)."""
    if mode != "rescore":
        return (f"--llm {LEXICON_ONLY} ranks candidates without a language model; --llm-mode {mode} needs one "
                "(leave --llm-mode out)")
    if lexicon is not None and str(lexicon).strip().lower() == "none":
        return (f"--llm {LEXICON_ONLY} needs a lexicon; --lexicon none turns them off (--llm none reads without "
                "correction)")
    return None


def without_llm_note(cause: str, mode: str, lexicon: object) -> str:
    """The line saying that the default LLM cannot run (``cause``) and what corrects instead:
    the correction without a language model where ``mode`` and ``lexicon`` allow it."""
    instead = (f"doubtful words are corrected without it (--llm {LEXICON_ONLY})"
               if lexicon_only_problem(mode, lexicon) is None else "no correction")
    return f"the default LLM cannot run ({cause}): {instead}; --llm none reads without any correction"


#: The relative character widths shipped with the package (the default of :class:`GapRule`).
CHAR_WIDTHS_FILE = Path(__file__).resolve().parents[1] / "assets" / "char_widths.json"
#: The default gate threshold (docs/DESIGN.md section 7); a bundle's ``threshold`` overrides it.
DEFAULT_THRESHOLD = 0.8


class SettingsError(ValueError):
    """A setting that cannot work; the message names it (``section.field``)."""


@lru_cache(maxsize=1)
def shipped_char_widths() -> dict[str, float]:
    """The shipped relative character widths (empty when the file is missing)."""
    if not CHAR_WIDTHS_FILE.is_file():
        return {}
    raw = json.loads(CHAR_WIDTHS_FILE.read_text(encoding="utf-8"))["widths"]
    return {str(c): float(w) for c, w in raw.items()}


def _finite(where: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{where} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise SettingsError(f"{where} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise SettingsError(f"{where} must be <= {high}, got {value!r}")


def _choice(where: str, value: object, kind: Any) -> None:
    if value not in get_args(kind):
        raise SettingsError(f"{where} must be one of {', '.join(map(repr, get_args(kind)))}, got {value!r}")


def _count(where: str, value: object, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingsError(f"{where} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class JointRescoring:
    """Joint CTC/attention choice between the decoder's word and the CTC best path
    (:func:`runtime.decoding.ctc_rescored`): the weights of the two log-likelihoods (the CTC
    likelihood alone chose best at the default model's padding)."""

    ctc: float = 1.0
    decoder: float = 0.0
    #: where the chosen CTC reading has a gap (:class:`GapRule`), insert the characters the
    #: decoder's word has there and keep every character the CTC head read
    #: (:func:`runtime.decoding.gap_filled`); ``--decode cascade`` then also sends words with
    #: a gap to the decoders. Off: the decoders' word is taken whole or not at all.
    fill_gaps: bool = False
    #: a gap takes at most its estimated number of missing characters plus this many
    fill_slack: int = 1

    def check(self) -> None:
        _finite("joint.ctc", self.ctc, 0.0)
        _finite("joint.decoder", self.decoder, 0.0)
        if not isinstance(self.fill_gaps, bool):
            raise SettingsError(f"joint.fill_gaps must be true or false, got {self.fill_gaps!r}")
        if not isinstance(self.fill_slack, int) or isinstance(self.fill_slack, bool) or self.fill_slack < 0:
            raise SettingsError(f"joint.fill_slack must be a whole number >= 0, got {self.fill_slack!r}")


@dataclass(frozen=True)
class GapRule:
    """Where the CTC frames say characters are missing (:func:`runtime.decoding.find_gaps`).

    A gap is two neighbouring characters at least ``ratio`` times and ``min_extra`` frames
    farther apart than expected (the word's pitch times the pair's mean ``char_widths``);
    a word's own pitch is trusted from ``min_distances`` distances on, else pulled towards
    ``prior_pitch``. In a word with a gap, boundaries at least ``weak_ratio`` pitches apart
    count as one-character gaps too (None: never)."""

    ratio: float = 1.5
    min_extra: float = 1.5
    prior_pitch: float = 3.0
    min_distances: int = 4
    weak_ratio: float | None = 1.3
    #: relative widths of characters in the tower's CTC frames (1.0: the median character;
    #: characters not listed count 1.0), fitted by ``python -m benchmarks.char_widths``
    char_widths: dict[str, float] = field(default_factory=shipped_char_widths, compare=False)

    def check(self) -> None:
        _finite("gaps.ratio", self.ratio, 0.0)
        _finite("gaps.min_extra", self.min_extra, 0.0)
        _finite("gaps.prior_pitch", self.prior_pitch, 0.0)
        _count("gaps.min_distances", self.min_distances, 1)
        if self.weak_ratio is not None:
            _finite("gaps.weak_ratio", self.weak_ratio)
            if not self.weak_ratio > 0:
                raise SettingsError(f"gaps.weak_ratio must be > 0 or null, got {self.weak_ratio!r}")
        if not isinstance(self.char_widths, dict):
            raise SettingsError("gaps.char_widths must map characters to widths")
        for c, w in self.char_widths.items():
            if not isinstance(c, str) or len(c) != 1:
                raise SettingsError(f"gaps.char_widths: {c!r} is not one character")
            _finite(f"gaps.char_widths[{c!r}]", w, 0.0)

    def find_gaps_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`runtime.decoding.find_gaps` for this rule."""
        return {"ratio": self.ratio, "prior": self.prior_pitch, "min_distances": self.min_distances,
                "min_extra": self.min_extra, "widths": self.char_widths}


@dataclass(frozen=True)
class GateSettings:
    """Which words the corrector reviews besides those with a character below the threshold."""

    #: a confident word found in no lexicon (prior below ``rare_logprob``) is reviewed too
    #: (rescore with lexicons and inserts): a skipped character need not leave a gap
    review_unknown: bool = True
    #: wordfreq's list holds fragments such as "thm": absence alone is too weak a signal
    rare_logprob: float = -14.0
    #: with inserts, symbols inside a word (``dr_ss``) are masked too (a decoder may write
    #: one where a character is covered)
    mask_inner_symbols: bool = True
    #: words with a larger masked fraction keep the vision answer (1.0: no limit)
    max_masked_fraction: float = 0.6

    def check(self) -> None:
        if not isinstance(self.review_unknown, bool) or not isinstance(self.mask_inner_symbols, bool):
            raise SettingsError("gate.review_unknown and gate.mask_inner_symbols must be true or false")
        _finite("gate.rare_logprob", self.rare_logprob)
        _finite("gate.max_masked_fraction", self.max_masked_fraction, 0.0, 1.0)
        if not self.max_masked_fraction > 0:
            raise SettingsError("gate.max_masked_fraction must be within (0, 1]")


@dataclass(frozen=True)
class CandidateSettings:
    """How candidates are generated (rescore): the decoder's top-k and the lexicons."""

    #: alternatives per masked position from the decoder's top-k
    k: int = 5
    #: most top-k candidates kept (the best by the decoder's probabilities)
    max_candidates: int = 32
    #: lexicon words kept per lexicon after the cheap (visual + prior) ranking
    lexicon_pool: int = 32
    #: lexicon words with up to this many more inner characters are candidates too (0: never)
    inserts: int = 2
    insert_at: InsertAt = "anywhere"
    #: insert_at="gaps": a gap may take up to its estimated missing count + this
    gap_slack: int = 1
    #: the decoder's log-probability charged per inserted character in the lexicon's pool
    #: ranking (and the visual term of the decoder scoring)
    insert_logprob: float = -1.0
    #: the prior of a candidate found in no lexicon (when lexicons are used)
    oov_logprob: float = -20.0
    #: candidates the LLM scores (the best by the cheap ranking)
    llm_candidates: int = 3
    #: the LLM sees the word lower-cased (the output keeps the decoder's case pattern)
    lowercase: bool = True

    def check(self) -> None:
        for name in ("k", "max_candidates", "llm_candidates"):
            _count(f"candidates.{name}", getattr(self, name), 1)
        for name in ("lexicon_pool", "inserts", "gap_slack"):
            _count(f"candidates.{name}", getattr(self, name), 0)
        _choice("candidates.insert_at", self.insert_at, InsertAt)
        _finite("candidates.insert_logprob", self.insert_logprob, high=0.0)
        _finite("candidates.oov_logprob", self.oov_logprob, high=0.0)
        if not isinstance(self.lowercase, bool):
            raise SettingsError("candidates.lowercase must be true or false")


@dataclass(frozen=True)
class Weights:
    """One weight per named score term (:class:`runtime.correction.score.ScoreTerms`)."""

    #: the visual log-probability (CTC likelihood ratio, or the decoder's)
    visual: float = 1.0
    #: the lexicon's frequency prior (natural-log word probability)
    prior: float = 1.0
    #: nats per character inserted at a CTC gap (up to the characters it lost)
    gap: float = 12.0
    #: nats per other inserted character (a covered character reads as blank frames)
    insertion: float = 6.0
    #: nats per inner symbol replaced by a letter or digit
    symbol: float = 4.0
    #: the LLM's log-probability of the word
    llm: float = 0.5
    #: decoder scoring: per CTC gap a candidate leaves empty (<= 0: a charge)
    unfilled_gap: float = -4.0

    def check(self) -> None:
        for name in ("visual", "prior", "gap", "insertion", "symbol", "llm"):
            _finite(f"weights.{name}", getattr(self, name), 0.0)
        _finite("weights.unfilled_gap", self.unfilled_gap, high=0.0)


@dataclass(frozen=True)
class Margins:
    """The keep-or-replace rule (:func:`runtime.correction.decide.keep_or_replace`), and when
    the LLM is asked."""

    #: the read word is replaced only by a candidate scoring more than this above it (nats)
    keep: float = 1.0
    #: ... more than this when it changes characters of a word of at most ``short_length``
    #: characters without adding any
    short: float = 4.0
    short_length: int = 3
    #: ... more than this when neither word is in a lexicon
    unknown: float = 1.0
    #: the LLM is skipped when the cheap ranking's best leads the next by more (nats)
    llm: float = 3.0

    def check(self) -> None:
        for name in ("keep", "short", "unknown", "llm"):
            _finite(f"margins.{name}", getattr(self, name), 0.0)
        _count("margins.short_length", self.short_length, 0)


#: Rescore prompt: the candidate follows the prefix and is closed by the suffix, whose
#: tokens are scored too so the model judges that the word is complete.
RESCORE_PREFIX = 'A word read from a photo of a sign: "'
RESCORE_SUFFIX = '"'
#: Fill prompt: worked examples, then the masked word; the grammar shapes the answer.
#: (Chosen over an instruction-style and a question-style prompt on a dozen masked words
#: with SmolLM2-135M: it restored the most of them.)
FILL_TEMPLATE = (
    "Fill in the missing letter ({mask}) of each English word.\n"
    "c{mask}ffee -> coffee\n"
    "st{mask}tion -> station\n"
    "h{mask}spital -> hospital\n"
    "{pattern} ->"
)


@dataclass(frozen=True)
class FillSettings:
    """The fill mode: what a masked position may hold, and the prompt."""

    #: "alnum": the charset's letters and digits plus what the decoder's top-k has there;
    #: "charset": all of it; "topk": only the top-k
    slots: FillSlots = "alnum"
    template: str = FILL_TEMPLATE

    def check(self) -> None:
        _choice("fill.slots", self.slots, FillSlots)
        if "{pattern}" not in self.template:
            raise SettingsError("fill.template must contain {pattern}")


@dataclass(frozen=True)
class LLMRuntime:
    """How the model runs: llama.cpp context and threads, the time budget, the cache, prompts."""

    n_ctx: int = 256
    #: None: half of os.cpu_count(), at least 1
    n_threads: int | None = None
    #: wall-clock budget per reviewed word, in seconds (None: no limit)
    time_budget_s: float | None = 2.0
    #: entries of the LRU cache of LLM results (0 disables it)
    cache_size: int = 4096
    rescore_prefix: str = RESCORE_PREFIX
    rescore_suffix: str = RESCORE_SUFFIX

    def check(self) -> None:
        _count("llm.n_ctx", self.n_ctx, 16)
        if self.n_threads is not None:
            _count("llm.n_threads", self.n_threads, 1)
        if self.time_budget_s is not None:
            _finite("llm.time_budget_s", self.time_budget_s)
            if not self.time_budget_s > 0:
                raise SettingsError(f"llm.time_budget_s must be > 0 or null, got {self.time_budget_s!r}")
        _count("llm.cache_size", self.cache_size, 0)


@dataclass(frozen=True)
class LMFill:
    """Without a corrector (``--llm none``), the ``full`` and ``cascade`` decode modes fill
    the CTC reading's gaps between two letters with the letters a character language model
    of the shipped word list likes best (:mod:`runtime.lm_fill`); with a corrector its own
    candidates do that (the model's best fills among them: ``candidates``). Chosen on the
    validation sets (docs/correction.md)."""

    enabled: bool = True
    #: the character model's n-gram order (:class:`runtime.charlm.CharLM`)
    order: int = 6
    #: most characters inserted into one word
    max_inserts: int = 2
    #: a gap takes at most its estimated number of missing characters plus this many
    slack: int = 1
    #: natural-log cost of each inserted character (the reading as read competes too)
    insert_logprob: float = -2.0
    #: readings shorter than this are never filled
    min_length: int = 2
    #: in a word with a gap, slots wider than ``gaps.weak_ratio`` pitches may take a letter too
    weak_slots: bool = True
    #: with a corrector (``--llm``): how many of the model's best fills of a word's gaps join
    #: its candidates (0: none; the lexicon's words and the decoder's alternatives only)
    candidates: int = 0

    def check(self) -> None:
        if not isinstance(self.enabled, bool):
            raise SettingsError(f"lm_fill.enabled must be true or false, got {self.enabled!r}")
        _count("lm_fill.order", self.order, 1)
        _count("lm_fill.max_inserts", self.max_inserts, 1)
        if self.max_inserts > 3:
            raise SettingsError(f"lm_fill.max_inserts must be at most 3, got {self.max_inserts!r}")
        _count("lm_fill.slack", self.slack, 0)
        _finite("lm_fill.insert_logprob", self.insert_logprob)
        _count("lm_fill.min_length", self.min_length, 2)
        _count("lm_fill.candidates", self.candidates, 0)
        if not isinstance(self.weak_slots, bool):
            raise SettingsError(f"lm_fill.weak_slots must be true or false, got {self.weak_slots!r}")


#: The sections of :class:`CorrectionSettings`, by name.
SECTIONS = {"joint": JointRescoring, "gaps": GapRule, "gate": GateSettings, "candidates": CandidateSettings,
            "weights": Weights, "margins": Margins, "fill": FillSettings, "llm": LLMRuntime, "lm_fill": LMFill}


@dataclass(frozen=True)
class CorrectionSettings:
    """Everything that decides a correction, in sections; checked once when made."""

    mode: Mode = "rescore"
    #: the gate: characters below it are masked (the bundle's ``threshold`` by default)
    threshold: float = DEFAULT_THRESHOLD
    visual: Visual = "ctc"
    joint: JointRescoring = field(default_factory=JointRescoring)
    gaps: GapRule = field(default_factory=GapRule)
    gate: GateSettings = field(default_factory=GateSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    weights: Weights = field(default_factory=Weights)
    margins: Margins = field(default_factory=Margins)
    fill: FillSettings = field(default_factory=FillSettings)
    llm: LLMRuntime = field(default_factory=LLMRuntime)
    lm_fill: LMFill = field(default_factory=LMFill)

    def __post_init__(self) -> None:
        _choice("mode", self.mode, Mode)
        _choice("visual", self.visual, Visual)
        _finite("threshold", self.threshold, 0.0, 1.0)
        for name, kind in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, kind):
                raise SettingsError(f"{name} must be a {kind.__name__}, got {type(section).__name__}")
            section.check()

    # -- JSON (the manifest's ``correction`` section, --correction-config) ----------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every field); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: CorrectionSettings | None = None) -> CorrectionSettings:
        """``base`` (default: the defaults) with the fields ``data`` gives (any subset, in the
        :meth:`to_dict` shape); an unknown key or a bad value raises :class:`SettingsError`."""
        return (base or cls()).merged(data)

    def merged(self, data: dict[str, Any]) -> CorrectionSettings:
        """These settings with ``data``'s fields (any subset, :meth:`to_dict`'s shape) put over them."""
        if not isinstance(data, dict):
            raise SettingsError("correction settings must be a JSON object")
        top = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("about", "provenance"):  # documentation only
                continue
            if key not in top:
                raise SettingsError(f"unknown correction setting {key!r} (known: {', '.join(sorted(top))})")
            current = getattr(self, key)
            if is_dataclass(current):
                if not isinstance(value, dict):
                    raise SettingsError(f"{key} must be a JSON object")
                names = {f.name for f in fields(current)}
                unknown = sorted(set(value) - names)
                if unknown:
                    raise SettingsError(f"unknown setting {key}.{unknown[0]} (known: {', '.join(sorted(names))})")
                changes[key] = replace(current, **value)
            else:
                changes[key] = value
        return replace(self, **changes)

    @classmethod
    def from_file(cls, path: str | Path, base: CorrectionSettings | None = None) -> CorrectionSettings:
        """:meth:`from_dict` of a JSON file; an unreadable file raises :class:`SettingsError`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingsError(f"{path}: cannot be read as JSON ({exc})") from None
        try:
            return cls.from_dict(data, base)
        except (SettingsError, TypeError) as exc:
            raise SettingsError(f"{path}: {exc}") from None

    # -- the flat names of the first settings class (runtime.llm.CorrectorSettings) ---------
    def with_flat(self, **changes: Any) -> CorrectionSettings:
        """These settings with fields changed by their flat names (:data:`FLAT_NAMES`)."""
        nested: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in FLAT_NAMES:
                raise TypeError(f"unknown correction setting {name!r}")
            section, key = FLAT_NAMES[name]
            if section is None:
                nested[key] = value
            else:
                nested.setdefault(section, {})[key] = value
        return self.merged(nested)


#: The flat setting names (benchmarks, tests, ``Corrector.from_spec(**settings)``) ->
#: (section, field); section None: a top-level field.
FLAT_NAMES: dict[str, tuple[str | None, str]] = {
    "mode": (None, "mode"), "threshold": (None, "threshold"), "visual": (None, "visual"),
    "k": ("candidates", "k"), "max_candidates": ("candidates", "max_candidates"),
    "lexicon_pool": ("candidates", "lexicon_pool"), "inserts": ("candidates", "inserts"),
    "insert_at": ("candidates", "insert_at"), "gap_slack": ("candidates", "gap_slack"),
    "insert_logprob": ("candidates", "insert_logprob"), "oov_logprob": ("candidates", "oov_logprob"),
    "llm_candidates": ("candidates", "llm_candidates"), "lowercase": ("candidates", "lowercase"),
    "insert_credit": ("weights", "insertion"), "gap_credit": ("weights", "gap"),
    "symbol_credit": ("weights", "symbol"), "weight": ("weights", "llm"), "prior_weight": ("weights", "prior"),
    "unfilled_gap_logprob": ("weights", "unfilled_gap"),
    "keep_margin": ("margins", "keep"), "short_margin": ("margins", "short"),
    "short_length": ("margins", "short_length"), "unknown_margin": ("margins", "unknown"),
    "llm_margin": ("margins", "llm"),
    "review_unknown": ("gate", "review_unknown"), "rare_logprob": ("gate", "rare_logprob"),
    "mask_inner_symbols": ("gate", "mask_inner_symbols"), "max_masked_fraction": ("gate", "max_masked_fraction"),
    "weak_gap_ratio": ("gaps", "weak_ratio"),
    "fill_slots": ("fill", "slots"), "fill_template": ("fill", "template"),
    "time_budget_s": ("llm", "time_budget_s"), "cache_size": ("llm", "cache_size"), "n_ctx": ("llm", "n_ctx"),
    "n_threads": ("llm", "n_threads"), "rescore_prefix": ("llm", "rescore_prefix"),
    "rescore_suffix": ("llm", "rescore_suffix"),
}
