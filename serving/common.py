"""What the Serve deployment and the batch reader share: the recognizer's settings and the
one-line message for a missing extra."""

from __future__ import annotations

import importlib.util
import signal
import threading
from typing import Any

from runtime.options import RecognizerConfig
from runtime.options import add_recognizer_options as shared_options
from runtime.records import json_record

__all__ = ["RecognizerConfig", "RecognizerSettings", "add_recognizer_options", "json_record",
           "missing_serve_extra", "one_line", "settings_from_args", "stop_on_signals"]

#: Modules of the ``serve`` extra, with the PyPI package that provides each.
SERVE_MODULES = {"ray": "ray[serve,data]", "pyarrow": "pyarrow", "starlette": "ray[serve]",
                 "python_multipart": "python-multipart"}


def missing_serve_extra(modules: tuple[str, ...] = tuple(SERVE_MODULES)) -> str | None:
    """None when ``modules`` import, else the one line telling which extra to install."""
    missing = sorted({SERVE_MODULES.get(m, m).split("[")[0] for m in modules if importlib.util.find_spec(m) is None})
    if not missing:
        return None
    return f"error: this command needs {', '.join(missing)}: pip install 'clipllama[serve]'"


def stop_on_signals() -> None:
    """SIGTERM and SIGINT (even where a background start ignores it) raise KeyboardInterrupt,
    so the command stops Ray cleanly instead of leaving its processes behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


#: The recognizer's settings, as every entry point defines them (:mod:`runtime.options`).
RecognizerSettings = RecognizerConfig


def add_recognizer_options(parser: Any) -> None:
    """The recognizer options of ``clipllama-run`` (:func:`runtime.options.add_recognizer_options`),
    with the threads of each worker."""
    shared_options(parser, "; GPU workers pick the GPU backends",
                   threads_help="onnxruntime threads per worker (default: its --num-cpus, rounded up)")


def settings_from_args(args: Any) -> RecognizerConfig:
    return RecognizerConfig.from_args(args)


def one_line(exc: BaseException) -> str:
    """The root cause of an exception raised inside Ray, as one line."""
    cause: BaseException = exc
    seen = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {text}" if text and type(cause).__name__ not in text else (text or
                                                                                               type(cause).__name__)
