"""What the Serve deployment and the batch reader share: the recognizer's settings and the
one-line message for a missing extra."""

from __future__ import annotations

import importlib.util
import math
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.recognizer import ReadResult, Recognizer

#: Modules of the ``serve`` extra, with the PyPI package that provides each.
SERVE_MODULES = {"ray": "ray[serve,data]", "pyarrow": "pyarrow", "starlette": "ray[serve]",
                 "python_multipart": "python-multipart"}


def missing_serve_extra(modules: tuple[str, ...] = tuple(SERVE_MODULES)) -> str | None:
    """None when ``modules`` import, else the one line telling which extra to install."""
    missing = [SERVE_MODULES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"error: this command needs {', '.join(sorted(set(missing)))}: "
            "pip install 'clipllama[serve]'")


def stop_on_signals() -> None:
    """SIGTERM and SIGINT (even where a background start ignores it) raise KeyboardInterrupt,
    so the command stops Ray cleanly instead of leaving its processes behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class RecognizerSettings:
    """How each replica or actor builds its recognizer (the options of ``clipllama-run``)."""

    engine: str | None = None
    backend: str = "auto"
    precision: str | None = None
    llm: str | None = None
    llm_mode: str = "rescore"
    threshold: float | None = None
    #: the user's word list for the rescore mode ("default": the English list; "none": off)
    lexicon: str | None = "default"
    #: onnxruntime threads; None: the CPUs reserved for the replica or actor
    threads: int | None = None

    def build(self, num_cpus: float | None = None) -> Recognizer:
        """Load the bundle and the LLM once (for one replica or actor)."""
        threads = self.threads or (max(1, math.ceil(num_cpus)) if num_cpus else None)
        return Recognizer.from_bundle(Path(self.engine) if self.engine else None, backend=self.backend,
                                      llm=self.llm, threshold=self.threshold, llm_mode=self.llm_mode,
                                      precision=self.precision, threads=threads, lexicon=self.lexicon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_recognizer_options(parser: Any) -> None:
    """The recognizer options of ``clipllama-run`` (:func:`runtime.cli.add_recognizer_options`)
    and the threads of each worker."""
    from runtime.cli import add_recognizer_options as shared

    shared(parser, "; GPU workers pick the GPU backends")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="onnxruntime threads per worker (default: its --num-cpus, rounded up)")


def settings_from_args(args: Any) -> RecognizerSettings:
    return RecognizerSettings(engine=args.engine, backend=args.backend, precision=args.precision, llm=args.llm,
                              llm_mode=args.llm_mode, threshold=args.threshold, threads=args.threads,
                              lexicon=args.lexicon)


def json_record(result: ReadResult, recognizer: Recognizer | None, set_name: str | None = None) -> dict[str, Any]:
    """The record ``clipllama-run --json`` prints for ``result`` (see ``runtime.cli._print``):
    :meth:`ReadResult.to_dict`, the set's name in a named set, the backend that read it."""
    data = result.to_dict()
    if set_name is not None:
        data["set"] = set_name
    if recognizer is not None:
        from runtime.cli import backend_info

        backend = backend_info(recognizer)
        data["backend"] = f"{backend['name']} {backend['precision']}"
    return data
