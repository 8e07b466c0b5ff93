"""What the Serve deployment and the batch reader share: the recognizer's settings and the
one-line message for a missing extra."""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading
from typing import Any

from runtime.options import RecognizerConfig
from runtime.options import add_recognizer_options as shared_options
from runtime.records import json_record

__all__ = ["RecognizerConfig", "RecognizerSettings", "add_recognizer_options", "check_recognizer", "json_record",
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


def check_recognizer(args: Any) -> str | None:
    """What is wrong with the recognizer's options, in one line, before Ray starts (None:
    nothing); the lines a user must see (:meth:`RecognizerConfig.warnings`) go to stderr."""
    from runtime.options import OptionError

    try:
        settings = settings_from_args(args)
        bundle = settings.check(verify=True)
    except OptionError as exc:
        return str(exc)
    for warning in settings.warnings(bundle):
        print(f"warning: {warning}", file=sys.stderr)
    return None


def one_line(exc: BaseException) -> str:
    """The root cause of an exception raised inside Ray, as one line: the last line of the
    deepest message in its chain of causes that says something (Ray's wrappers carry the
    actor's traceback as text; a module path before the error's name is dropped)."""
    import re

    messages, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = [line.strip() for line in str(current).splitlines() if line.strip()]
        if lines:
            messages.append((type(current).__name__, lines[-1]))
        inner = getattr(current, "cause", None) or current.__cause__ or current.__context__
        current = inner if isinstance(inner, BaseException) else None
    if not messages:
        return type(exc).__name__
    name, text = messages[-1]
    named = re.match(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit)): (.+)$", text)
    if named:
        return named[2] if named[1] in ("BundleError", "BackendError", "OptionError", "ImageError", "InputError") else \
            f"{named[1]}: {named[2]}"
    return text if name in text or ": " in text else f"{name}: {text}"
