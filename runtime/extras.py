"""One line, not an import traceback, when ``python -m PACKAGE.MODULE`` runs in an install
that lacks the extra it needs (the runtime alone has no torch). The packages that need an
extra (``export``, ``training``) call :func:`refuse_missing` from their ``__init__``, which
runs before the module itself is imported."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence

#: (module, the PyPI package that provides it)
Needs = Sequence[tuple[str, str]]


def command_being_run() -> str | None:
    """The module ``python -m`` is about to run, while its package is being imported for it."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[:-1]:
        return None
    return argv[argv.index("-m") + 1]


def missing_line(command: str, needs: Needs, extra: str) -> str | None:
    """The one line for ``python -m COMMAND`` when a package it needs is not installed."""
    missing = [package for module, package in needs if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"error: python -m {command} needs {', '.join(missing)}, which this install does not have: "
            f"pip install 'clipllama[{extra}]'")


def refuse_missing(package: str, commands: Mapping[str, Needs], extra: str, default: Needs = ()) -> None:
    """Exit 2 with :func:`missing_line` when the ``python -m`` command being run is one of
    ``package``'s and lacks what it needs (``commands``; ``default`` for the others)."""
    command = command_being_run()
    if command is None or not command.startswith(f"{package}."):
        return
    message = missing_line(command, commands.get(command, default), extra)
    if message:
        print(message, file=sys.stderr)
        raise SystemExit(2)
