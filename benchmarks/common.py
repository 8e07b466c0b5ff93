"""What every benchmark shares: the machine's description, the sets, statistics, tables.

Sets are read with the runtime's reader (``runtime.inputs.open_input``: a folder with
``images/`` + ``labels.tsv``, a labels ``.tsv`` with ``images/`` beside it, or an LMDB
folder), so no benchmark needs torch to read one. Labels the protocol drops (over 25
characters, ``runtime.charset.keep_for_eval``) are left out before anything is timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.charset import keep_for_eval
from runtime.inputs import open_labelled
from runtime.preprocess import ImageError, load_image


@dataclass
class EvalSet:
    """A labelled set, protocol-filtered: display name, images (loaded) and labels."""

    name: str
    path: str
    images: list[Image.Image]
    labels: list[str]
    sources: list[str]
    #: samples the protocol drops (label over 25 characters)
    dropped: int = 0
    #: images that could not be read (reported, left out for every contender)
    unreadable: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def set_name(path: str | Path) -> str:
    """A short name: ``svt_test_647`` for a folder, ``ic13_857`` for ``ic13/labels_857.tsv``."""
    p = Path(path)
    if p.suffix.lower() == ".tsv":
        stem = p.stem.removeprefix("labels").strip("_-")
        return f"{p.parent.name}_{stem}" if stem else p.parent.name
    return p.name


def load_set(path: str | Path, limit: int | None = None) -> EvalSet:
    """Read a labelled set into memory (images decoded once, before any timing).

    Raises ``InputError`` when ``path`` is not a labelled set. Unreadable images are listed
    in ``unreadable`` and left out.
    """
    opened = open_labelled(path)
    images, labels, sources, unreadable = [], [], [], []
    dropped = 0
    for sample in opened.samples:
        if limit is not None and len(labels) >= limit:
            break
        if sample.label is None or not keep_for_eval(sample.label):
            dropped += 1
            continue
        try:
            images.append(load_image(sample.data))  # type: ignore[arg-type]
        except ImageError as exc:
            unreadable.append(str(exc))
            continue
        labels.append(sample.label)
        sources.append(sample.source)
    return EvalSet(set_name(path), str(path), images, labels, sources, dropped, unreadable)


def load_sets(paths: Sequence[str | Path], limit: int | None = None) -> list[EvalSet]:
    """:func:`load_set` for each path; names made unique (``name#2``)."""
    sets, seen = [], {}
    for path in paths:
        s = load_set(path, limit)
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
        for problem in s.unreadable or []:
            print(f"warning: {s.name}: {problem} (left out)", file=sys.stderr)
        sets.append(s)
    return sets


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over paired measurements of ``time / baseline_time`` (noise-robust ratio)."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True) if b > 0]
    return median(ratios)


def rotate(items: Sequence[Any], step: int) -> list[Any]:
    """``items`` rotated by ``step``: who runs first changes from one round to the next."""
    if not items:
        return []
    k = step % len(items)
    return list(items[k:]) + list(items[:k])


# -- machine and output ----------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpu": cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["load_avg"] = round(os.getloadavg()[0], 2)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    from runtime.backends import gpu_compute_capability

    info["gpu_compute_capability"] = gpu_compute_capability()
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = info.get("gpu_compute_capability")
    return (f"Machine: {info['cpu']}, {info['nproc']} CPUs, "
            f"{'GPU sm' + gpu if gpu else 'no GPU'}, Python {info['python']}, "
            f"onnxruntime {info.get('onnxruntime', '-')}, load average at start {info.get('load_avg', '-')}")


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table; '-' for missing or NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; numbers right-aligned."""
    def is_number(text: str) -> bool:
        return text.replace(".", "", 1).replace("-", "", 1).replace("x", "").replace("%", "").isdigit()

    cells = [[str(c) for c in row] for row in rows]
    align = ["---:" if cells and all(is_number(r[i]) or r[i] == "-" for r in cells) else "---"
             for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def print_json(document: dict[str, Any]) -> None:
    """One JSON object on one line (the last line a caller parses)."""
    print(json.dumps(document, default=_jsonable, allow_nan=False), flush=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean_nan(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_nan(v) for v in value]
    return value
