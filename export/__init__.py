"""Checkpoint -> bundle (``export.onnx``), its checks (``export.verify``, ``export.lint``,
``export.scale_check``) and TensorRT engines (``export.trt``).

These need the ``export`` extra (PyTorch, onnx, onnxslim, open_clip), which the runtime does
not. Run as a command (``python -m export.onnx ...``) in an install without it, a module
says so in one line and exits 2, instead of ending in an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys

#: What each command needs, as (module, the package that provides it).
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "export.onnx": (("torch", "torch"), ("onnx", "onnx"), ("onnxslim", "onnxslim"), ("open_clip", "open_clip_torch")),
    "export.verify": (("torch", "torch"), ("open_clip", "open_clip_torch")),
    "export.scale_check": (("torch", "torch"), ("onnx", "onnx"), ("open_clip", "open_clip_torch")),
    "export.lint": (("onnx", "onnx"),),
}


def missing_extra(command: str) -> str | None:
    """The one line for ``python -m COMMAND`` when a package it needs is not installed (None: all are)."""
    missing = [package for module, package in NEEDS.get(command, ()) if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"error: python -m {command} needs {', '.join(missing)}, which the runtime install does not "
            "have: pip install 'clipllama[export]'")


def _command() -> str | None:
    """The module ``python -m`` is about to run, while this package is imported for it."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[:-1]:
        return None
    return argv[argv.index("-m") + 1]


_message = missing_extra(_command() or "")
if _message:
    print(_message, file=sys.stderr)
    raise SystemExit(2)
