"""Choose which crops the bundle reads again under extra views, on validation sets, and
write it to the manifest (``defaults.views``, :mod:`runtime.views`).

    python -m export.views BUNDLE --validation SET... [--stretches 1.1 1.2] [--turns]
                           [--precision P] [--threads N] [--json]

Each validation SET (labelled crops carved from the training data, never an eval set) is read
twice through the runtime, without an LLM, in the bundle's decode mode and CPU precision: with
one view, and with every crop read again under the extra views. A crop is read again when its
first reading is empty or less confident than a threshold, and its word does not depend on the
threshold, so the accuracy at every threshold of a grid follows from those two readings.
Chosen: the threshold with the most words gained over all sets together (fixed minus broken;
a tie goes to the lower threshold: fewer crops read again), provided no set reads worse than
with one view. When no threshold gains a word, ``defaults.views`` is removed (one view).

``--turns`` first fits which crops are also read turned a quarter each way (a grid of aspect
ratios, thresholds and margins; the same rule: most words gained, no set worse, ties to the
setting that turns fewest crops); the stretches are then measured on top of the turns. Without
it the bundle's turns, if any, are kept and read in both readings.
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
from export.recheck import RecheckError, labelled_samples, read_every_way
from runtime.backends import PRECISION_CHOICES
from runtime.bundle import load_bundle
from runtime.charset import word_correct
from runtime.inputs import Sample
from runtime.preprocess import load_image
from runtime.recognizer import Recognizer
from runtime.views import MANIFEST_KEY, TurnSettings, ViewSettings, surety, turned

#: thresholds tried (a crop whose first reading is less confident is read again)
GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
#: the extra views' horizontal stretches when none are given (measured on the default model's
#: validation crops: docs/views.md)
DEFAULT_STRETCHES = (1.1, 1.2)
#: turns tried: the least height/width ratio, the threshold and the margin
TURN_ASPECTS = (0.8, 1.0, 1.25, 1.5)
TURN_GRID = (0.5, 0.7, 0.9, 1.0)
TURN_MARGINS = (0.0, 0.1, 0.2, 0.3)


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
        right = [word_correct(t, label) for t, label in zip(self.one_view, self.labels)]
        after = [word_correct(t, label) for t, label in zip(self.all_views, self.labels)]
        again = self.again(below)
        fixed = sum(a and not r and g for r, a, g in zip(right, after, again))
        broken = sum(r and not a and g for r, a, g in zip(right, after, again))
        n = len(self.labels)
        return {"n": n, "one_view": round(100.0 * sum(right) / n, 3),
                "views": round(100.0 * (sum(right) + fixed - broken) / n, 3), "fixed": fixed, "broken": broken,
                "read_again_pct": round(100.0 * sum(again) / n, 2)}


#: a validation set: a labelled set's path, or its name and samples
LabelledSet = str | tuple[str, list[Sample]]


def opened(sets: Sequence[LabelledSet]) -> list[tuple[str, list[Sample]]]:
    """Each set's name and labelled samples (paths opened with the evaluation label policy)."""
    return [labelled_samples(str(s)) if isinstance(s, str | Path) else s for s in sets]


def read_with_views(bundle_dir: Path, sets: Sequence[LabelledSet], stretches: Sequence[float],
                    precision: str | None = None, threads: int | None = None, batch_size: int = 32,
                    turns: TurnSettings | None = None) -> list[ViewReadings]:
    """Each set read with one view and with every crop read again under ``stretches``
    (both readings with ``turns`` first, when given)."""
    sets = opened(sets)
    every = ViewSettings(tuple(stretches), 1.0, turns)
    one = ViewSettings((), 1.0, turns) if turns is not None else "off"
    readers = {key: Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision=precision,
                                           threads=threads, views=views)
               for key, views in (("one", one), ("all", every))}
    out = []
    try:
        for name, samples in sets:
            results = read_every_way(readers, name, samples, batch_size)
            out.append(ViewReadings(name, [str(s.label) for s in samples], [r.text for r in results["one"]],
                                    [float(r.confidence) for r in results["one"]], [r.text for r in results["all"]]))
    finally:
        for reader in readers.values():
            reader.close()
    return out


@dataclass
class TurnReadings:
    """One validation set: each crop's upright reading, its height/width and, for crops at
    least as tall as the grid's least ratio, its reading turned each way."""

    name: str
    labels: list[str]
    upright: list[tuple[str, float]]
    aspect: list[float]
    turned: dict[int, list[tuple[str, float]]]

    def figures(self, turns: TurnSettings) -> dict[str, Any]:
        """Words fixed and broken by ``turns``, accuracies and the share of crops turned."""
        fixed = broken = again = 0
        for i, turned_readings in self.turned.items():
            text, confidence = self.upright[i]
            if self.aspect[i] < turns.min_aspect or not (not text or confidence < turns.below_confidence):
                continue
            again += 1
            best = max(turned_readings, key=lambda r: surety(*r))
            if turns.prefers(self.upright[i], best):
                was = word_correct(text, self.labels[i])
                now = word_correct(best[0], self.labels[i])
                fixed, broken = fixed + (now and not was), broken + (was and not now)
        n = len(self.labels)
        right = sum(word_correct(t, label) for (t, _), label in zip(self.upright, self.labels))
        return {"n": n, "upright": round(100.0 * right / n, 3), "turns": round(100.0 * (right + fixed - broken) / n, 3),
                "fixed": fixed, "broken": broken, "turned_pct": round(100.0 * again / n, 2)}


def read_turned(bundle_dir: Path, sets: Sequence[LabelledSet], precision: str | None = None,
                threads: int | None = None, batch_size: int = 32) -> list[TurnReadings]:
    """Each set read upright (one view, the bundle's decode) and its tall crops turned each way
    (the CTC head's reading, in fp32 where the precision has a reference, as the runtime does)."""
    sets = opened(sets)
    upright = Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision=precision,
                                     threads=threads, views="off")
    reference = "fp32" if hasattr(upright.backend, "run_reference") else precision
    sideways = Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision=reference,
                                      threads=threads, views="off", decode="ctc")
    out = []
    try:
        for name, samples in sets:
            results = read_every_way({"upright": upright}, name, samples, batch_size)["upright"]
            pictures = [load_image(s.data, name=s.source) for s in samples]
            aspect = [p.height / max(1, p.width) for p in pictures]
            tall = [i for i, a in enumerate(aspect) if a >= min(TURN_ASPECTS)]
            turned_readings: dict[int, list[tuple[str, float]]] = {i: [] for i in tall}
            for clockwise in (False, True):
                for i, r in zip(tall, sideways.read([turned(pictures[i], clockwise) for i in tall],
                                                    batch_size=batch_size)):
                    turned_readings[i].append((r.text or "", float(r.confidence or 0.0)))
            out.append(TurnReadings(name, [str(s.label) for s in samples],
                                    [(r.text or "", float(r.confidence)) for r in results], aspect, turned_readings))
    finally:
        upright.close()
        sideways.close()
    return out


def choose_turns(readings: Sequence[TurnReadings]) -> dict[str, Any]:
    """The turn settings of the grid with the most words gained over all sets (none worse;
    ties: the fewest crops turned); ``turns`` is None when none gains."""
    tried, best, best_key = [], None, None
    for aspect in TURN_ASPECTS:
        for below in TURN_GRID:
            for margin in TURN_MARGINS:
                turns = TurnSettings(aspect, below, margin)
                sets = {r.name: r.figures(turns) for r in readings}
                gain = sum(s["fixed"] - s["broken"] for s in sets.values())
                holds = all(s["fixed"] >= s["broken"] for s in sets.values())
                turned_n = sum(s["turned_pct"] * s["n"] for s in sets.values())
                tried.append({**turns.to_dict(), "gain": gain, "holds": holds, "sets": sets})
                key = (gain, -turned_n, margin)
                if holds and gain > 0 and (best_key is None or key > best_key):
                    best, best_key = (turns, tried[-1]), key
    if best is None:
        return {"turns": None, "gain": 0, "sets": {}, "tried": tried}
    return {"turns": best[0], "gain": best[1]["gain"], "sets": best[1]["sets"], "tried": tried}


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
                precision: str | None, turns: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record ``choice`` as ``defaults.views`` with ``turns`` (a :func:`choose_turns` result
    with its figures); removed when neither chose anything."""
    manifest = read_manifest(bundle_dir)
    defaults = manifest.setdefault("defaults", {})
    turn_settings = turns["turns"] if turns else None
    if choice["below_confidence"] is None and turn_settings is None:
        defaults.pop(MANIFEST_KEY, None)
        return write_manifest(bundle_dir, manifest)
    chose_stretches = choice["below_confidence"] is not None
    settings = ViewSettings(tuple(stretches) if chose_stretches else (), choice["below_confidence"] or 1.0,
                            turn_settings)
    section = {**settings.to_dict(), "validation": list(validation), "precision": precision or "auto",
               "gain": choice["gain"], "sets": choice["sets"],
               "chosen_by": "python -m export.views", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if turn_settings is not None and turns is not None:
        section["turns"] = {**turn_settings.to_dict(), "gain": turns["gain"], "sets": turns["sets"]}
    defaults[MANIFEST_KEY] = section
    return write_manifest(bundle_dir, manifest)


def fit_views(bundle_dir: Path, sets: Sequence[LabelledSet], stretches: Sequence[float] = DEFAULT_STRETCHES,
              turns: bool = True, precision: str | None = None, threads: int | None = None) -> dict[str, Any] | None:
    """Fit the turns (with ``turns``) and then the stretches of the bundle at ``bundle_dir`` on
    ``sets`` and write them (:func:`write_views`); returns the settings written (None: one view)."""
    names = [s if isinstance(s, str | Path) else s[0] for s in sets]
    sets = opened(sets)
    fitted = choose_turns(read_turned(bundle_dir, sets, precision, threads)) if turns else None
    readings = read_with_views(bundle_dir, sets, stretches, precision, threads,
                               turns=fitted["turns"] if fitted else None)
    write_views(bundle_dir, choose(readings), stretches, [str(n) for n in names], precision, fitted)
    settings = ViewSettings.from_manifest(read_manifest(bundle_dir))
    return settings.to_dict() if settings is not None else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.views", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory (its manifest is changed in place)")
    parser.add_argument("--validation", nargs="+", required=True, metavar="SET",
                        help="labelled validation sets (carved from the training data, never an eval set)")
    parser.add_argument("--stretches", nargs="+", type=float, default=list(DEFAULT_STRETCHES), metavar="F",
                        help="horizontal stretch of each extra view (default: "
                             f"{' '.join(map(str, DEFAULT_STRETCHES))})")
    parser.add_argument("--turns", action="store_true",
                        help="also fit which tall crops are read turned a quarter each way (default: keep the "
                             "bundle's)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help="graph variant read (default: the bundle's CPU default)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--json", action="store_true", help="print the choice as one JSON line")
    return parser


def fitted_turns(bundle_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The turns the stretches are measured with: fitted now (``--turns``, a
    :func:`choose_turns` result), else the bundle's own with their recorded figures, else None."""
    if args.turns:
        turns = choose_turns(read_turned(bundle_dir, args.validation, args.precision, args.threads))
        for entry in turns["tried"]:
            if entry["holds"] and entry["gain"] > 0:
                print(f"turns {entry['min_aspect']} / {entry['below_confidence']} / {entry['margin']}: "
                      f"+{entry['gain']}", file=sys.stderr)
        return turns
    manifest = read_manifest(bundle_dir)
    current = ViewSettings.from_manifest(manifest)
    if current is None or current.turns is None:
        return None
    recorded = manifest["defaults"][MANIFEST_KEY]["turns"]
    return {"turns": current.turns, "gain": recorded.get("gain"), "sets": recorded.get("sets", {})}


def report(choice: dict[str, Any], turns: dict[str, Any] | None, args: argparse.Namespace, bundle_dir: Path) -> None:
    """Every threshold's figures on stderr, then the choice: one line, or JSON with ``--json``."""
    for entry in choice["tried"]:
        sets = ", ".join(f"{k} {v['views']:.2f} (one view {v['one_view']:.2f}, +{v['fixed']} -{v['broken']}, "
                         f"again {v['read_again_pct']:.1f}%)" for k, v in entry["sets"].items())
        print(f"below {entry['below_confidence']}: {sets}", file=sys.stderr)
    turned = turns["turns"] if turns else None
    if args.json:
        summary = {k: v for k, v in choice.items() if k != "tried"}
        if turns is not None:
            summary["turns"] = {**(turned.to_dict() if turned else {}), "gain": turns["gain"], "sets": turns["sets"]}
        print(json.dumps(summary))
        return
    if turned is not None:
        print(f"turns: {turned.to_dict()} (+{turns['gain']} words)")
    if choice["below_confidence"] is not None:
        print(f"views: crops below confidence {choice['below_confidence']} read again stretched by "
              f"{', '.join(map(str, args.stretches))} (+{choice['gain']} words; defaults.{MANIFEST_KEY} in "
              f"{bundle_dir / 'manifest.json'})")
    elif turned is not None:
        print("views: no stretch gains a word: the turns alone")
    else:
        print(f"no threshold gains a word: one view (defaults.{MANIFEST_KEY} removed from {bundle_dir})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle_dir = Path(args.bundle)
    try:
        bundle = load_bundle(bundle_dir)
        if not bundle.decode.ctc_rescoring:
            raise RecheckError(f"{bundle_dir}: extra views need an image encoder with a CTC head (ctc_log_probs)")
        ViewSettings(tuple(args.stretches), 1.0)  # the factors' check, before anything is read
        turns = fitted_turns(bundle_dir, args)
        readings = read_with_views(bundle_dir, args.validation, args.stretches, args.precision, args.threads,
                                   turns=turns["turns"] if turns else None)
    except (RecheckError, OSError, ValueError) as exc:
        print(f"export.views: {exc}", file=sys.stderr)
        return 2
    choice = choose(readings)
    write_views(bundle_dir, choice, args.stretches, args.validation, args.precision, turns)
    report(choice, turns, args, bundle_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
