"""Choose which crops the bundle reads again under extra views, on validation sets, and
write it to the manifest (``defaults.views``, :mod:`runtime.views`).

    python -m export.views BUNDLE --validation SET... [--stretches 1.1 1.2] [--precision P]
                           [--threads N] [--json]

Each validation SET (labelled crops carved from the training data, never an eval set) is read
twice through the runtime, without an LLM, in the bundle's decode mode and CPU precision: with
one view, and with every crop read again under the extra views. A crop is read again when its
first reading is empty or less confident than a threshold, and its word does not depend on the
threshold, so the accuracy at every threshold of a grid follows from those two readings.
Chosen: the threshold with the most words gained over all sets together (fixed minus broken;
a tie goes to the lower threshold: fewer crops read again), provided no set reads worse than
with one view. When no threshold gains a word, ``defaults.views`` is removed (one view).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.manifest import read_manifest, write_manifest
from export.recheck import RecheckError, labelled_samples
from runtime.backends import PRECISION_CHOICES
from runtime.bundle import load_bundle
from runtime.charset import eval_normalize
from runtime.recognizer import Recognizer
from runtime.views import MANIFEST_KEY, ViewSettings

#: thresholds tried (a crop whose first reading is less confident is read again)
GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
#: the extra views' horizontal stretches when none are given (measured on the default model's
#: validation crops: docs/views.md)
DEFAULT_STRETCHES = (1.1, 1.2)


@dataclass
class ViewReadings:
    """One validation set read with one view and with every crop read again."""

    name: str
    labels: list[str]
    one_view: list[str]
    confidence: list[float]
    all_views: list[str]

    def again(self, below: float) -> list[bool]:
        return [not text or c < below for text, c in zip(self.one_view, self.confidence)]

    def figures(self, below: float) -> dict[str, Any]:
        """Words fixed and broken by reading again below ``below``, accuracies and the share read again."""
        right = [eval_normalize(t) == eval_normalize(label) for t, label in zip(self.one_view, self.labels)]
        after = [eval_normalize(t) == eval_normalize(label) for t, label in zip(self.all_views, self.labels)]
        again = self.again(below)
        fixed = sum(a and not r and g for r, a, g in zip(right, after, again))
        broken = sum(r and not a and g for r, a, g in zip(right, after, again))
        n = len(self.labels)
        return {"n": n, "one_view": round(100.0 * sum(right) / n, 3),
                "views": round(100.0 * (sum(right) + fixed - broken) / n, 3), "fixed": fixed, "broken": broken,
                "read_again_pct": round(100.0 * sum(again) / n, 2)}


def read_with_views(bundle_dir: Path, sets: Sequence[str], stretches: Sequence[float], precision: str | None = None,
                    threads: int | None = None, batch_size: int = 32) -> list[ViewReadings]:
    """Each set read with one view and with every crop read again under ``stretches``."""
    opened = [labelled_samples(s) for s in sets]
    every = ViewSettings(tuple(stretches), 1.0)
    readers = {key: Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision=precision,
                                           threads=threads, views=views)
               for key, views in (("one", "off"), ("all", every))}
    out = []
    try:
        for name, samples in opened:
            results = {key: reader.read(samples, batch_size=batch_size) for key, reader in readers.items()}
            failed = [r.error for rs in results.values() for r in rs if not r.ok]
            if failed:
                raise RecheckError(f"{name}: {len(failed)} crop(s) could not be read ({failed[0]})")
            out.append(ViewReadings(name, [str(s.label) for s in samples], [r.text for r in results["one"]],
                                    [float(r.confidence) for r in results["one"]], [r.text for r in results["all"]]))
    finally:
        for reader in readers.values():
            reader.close()
    return out


def choose(readings: Sequence[ViewReadings], grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The threshold of ``grid`` with the most words gained over all sets (none lower than
    with one view; ties: the lower threshold), and every threshold's figures; the chosen
    ``below_confidence`` is None when none gains."""
    tried, best, best_gain = [], None, 0
    for below in grid:
        sets = {r.name: r.figures(below) for r in readings}
        gain = sum(s["fixed"] - s["broken"] for s in sets.values())
        holds = all(s["fixed"] >= s["broken"] for s in sets.values())
        tried.append({"below_confidence": below, "gain": gain, "holds": holds, "sets": sets})
        if holds and gain > best_gain:
            best, best_gain = tried[-1], gain
    return {"below_confidence": best["below_confidence"] if best else None, "gain": best_gain,
            "sets": best["sets"] if best else {}, "tried": tried}


def write_views(bundle_dir: Path, choice: dict[str, Any], stretches: Sequence[float], validation: Sequence[str],
                precision: str | None) -> dict[str, Any]:
    """Record ``choice`` as ``defaults.views`` (removed when it chose nothing)."""
    manifest = read_manifest(bundle_dir)
    defaults = manifest.setdefault("defaults", {})
    if choice["below_confidence"] is None:
        defaults.pop(MANIFEST_KEY, None)
    else:
        settings = ViewSettings(tuple(stretches), choice["below_confidence"])
        defaults[MANIFEST_KEY] = {
            **settings.to_dict(), "validation": list(validation), "precision": precision or "auto",
            "gain": choice["gain"], "sets": choice["sets"],
            "chosen_by": "python -m export.views", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    return write_manifest(bundle_dir, manifest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.views", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory (its manifest is changed in place)")
    parser.add_argument("--validation", nargs="+", required=True, metavar="SET",
                        help="labelled validation sets (carved from the training data, never an eval set)")
    parser.add_argument("--stretches", nargs="+", type=float, default=list(DEFAULT_STRETCHES), metavar="F",
                        help="horizontal stretch of each extra view (default: "
                             f"{' '.join(map(str, DEFAULT_STRETCHES))})")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="graph variant read (default: the bundle's CPU default)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--json", action="store_true", help="print the choice as one JSON line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle_dir = Path(args.bundle)
    try:
        bundle = load_bundle(bundle_dir)
        if not bundle.decode.ctc_rescoring:
            raise RecheckError(f"{bundle_dir}: extra views need an image encoder with a CTC head (ctc_log_probs)")
        ViewSettings(tuple(args.stretches), 1.0)  # the factors' check, before anything is read
        readings = read_with_views(bundle_dir, args.validation, args.stretches, args.precision, args.threads)
    except (RecheckError, OSError, ValueError) as exc:
        print(f"export.views: {exc}", file=sys.stderr)
        return 2
    choice = choose(readings)
    write_views(bundle_dir, choice, args.stretches, args.validation, args.precision)
    for entry in choice["tried"]:
        sets = ", ".join(f"{k} {v['views']:.2f} (one view {v['one_view']:.2f}, +{v['fixed']} -{v['broken']}, "
                         f"again {v['read_again_pct']:.1f}%)" for k, v in entry["sets"].items())
        print(f"below {entry['below_confidence']}: {sets}", file=sys.stderr)
    summary = {k: v for k, v in choice.items() if k != "tried"}
    if args.json:
        print(json.dumps(summary))
    elif choice["below_confidence"] is None:
        print(f"no threshold gains a word: one view (defaults.{MANIFEST_KEY} removed from {bundle_dir})")
    else:
        print(f"views: crops below confidence {choice['below_confidence']} read again stretched by "
              f"{', '.join(map(str, args.stretches))} (+{choice['gain']} words; defaults.{MANIFEST_KEY} in "
              f"{bundle_dir / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
