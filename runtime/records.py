"""What every entry point prints or writes about what it read: the JSON record of one
result, the plain line, the names of input sets, and the ``--eval`` scorer.

``clipllama-run``, ``clipllama-serve`` and ``clipllama-batch`` use these, so a record is the
same wherever it was read (timings aside)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.charset import WordAccuracy, eval_normalize
from runtime.inputs import InputSet

if TYPE_CHECKING:
    from runtime.recognizer import ReadResult, Recognizer


def backend_info(recognizer: Recognizer) -> dict[str, Any]:
    """What read the inputs: the backend that runs, its precision, why nothing faster ran."""
    backend = recognizer.backend
    info = {"name": getattr(backend, "name", "?"), "precision": getattr(backend, "precision", "?"),
            "notes": list(getattr(backend, "notes", []) or [])}
    warnings = list(getattr(backend, "warnings", []) or [])
    if warnings:
        info["warnings"] = warnings
    return info


def backend_label(recognizer: Recognizer | None) -> str | None:
    """``"NAME PRECISION"`` of the recognizer's backend, as records carry it."""
    if recognizer is None:
        return None
    info = backend_info(recognizer)
    return f"{info['name']} {info['precision']}"


def json_record(result: ReadResult, recognizer: Recognizer | None = None,
                set_name: str | None = None) -> dict[str, Any]:
    """The JSON record of ``result``: :meth:`ReadResult.to_dict`, the set's name in a named
    set, the backend that read it."""
    data = result.to_dict()
    if set_name is not None:
        data["set"] = set_name
    label = backend_label(recognizer)
    if label is not None:
        data["backend"] = label
    return data


def plain_line(result: ReadResult) -> str:
    """``SOURCE<TAB>TEXT<TAB>CONFIDENCE`` (confidence with 4 decimals) of a result that was read."""
    confidence = "" if result.confidence is None else f"{result.confidence:.4f}"
    return f"{result.source}\t{result.text or ''}\t{confidence}"


def error_line(result: ReadResult) -> str:
    """The one stderr line of a result that could not be read, naming its input once."""
    error = result.error or "unknown error"
    return f"error: {error}" if result.source in error else f"error: {result.source}: {error}"


def unique_names(sets: list[InputSet]) -> list[str | None]:
    """Each set's name, with ``#2``, ``#3``... for names given twice (None for loose files)."""
    seen: dict[str, int] = {}
    names: list[str | None] = []
    for s in sets:
        if s.name is None:
            names.append(None)
            continue
        seen[s.name] = seen.get(s.name, 0) + 1
        names.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")
    return names


def merge_loose(sets: list[InputSet]) -> list[InputSet]:
    """All loose files in one unnamed set, first, in the order given (with their notes)."""
    loose = [x for s in sets if s.name is None for x in s.samples]
    notes = [n for s in sets if s.name is None for n in s.notes]
    named = [s for s in sets if s.name is not None]
    return ([InputSet(None, loose, notes=notes)] if loose else []) + named


class SetScore:
    """Accumulates one set's ``--eval`` summary: protocol accuracy, gate rate and LLM effects."""

    def __init__(self) -> None:
        self.accuracy = WordAccuracy()
        self.gated = self.changed = self.fixed = self.broke = self.errors = 0

    def add(self, result: ReadResult, label: str) -> None:
        self.accuracy.update([result.text or ""], [label])
        self.errors += not result.ok
        self.gated += result.gated
        if result.llm_changed:
            self.changed += 1
            target = eval_normalize(label)
            before, after = eval_normalize(result.vision_text or ""), eval_normalize(result.text or "")
            self.fixed += before != target and after == target
            self.broke += before == target and after != target

    def as_dict(self) -> dict[str, Any]:
        n = self.accuracy.n
        return {**self.accuracy.as_dict(), "gate_rate": 100.0 * self.gated / n if n else 0.0,
                "llm_changed": self.changed, "llm_fixed": self.fixed, "llm_broke": self.broke,
                "errors": self.errors}
