"""Choose the bundle's ``int8+fp32`` threshold on validation sets and write it to the manifest.

    python -m export.recheck BUNDLE --validation SET... [--tolerance 0.2] [--no-default]
                             [--threads N] [--json]

``--precision int8+fp32`` reads every crop with the int8 graphs and encodes again in fp32
the crops whose int8 CTC reading is empty or less confident than a threshold
(:class:`runtime.backends.RecheckedBackend`). This reads each validation SET (labelled crops
carved from the training data, never an eval set) three ways through the runtime, in the
bundle's decode mode: fp32, int8, and the int8 CTC confidence of each crop. Since a crop read
again goes through exactly the fp32 path, the accuracy at every threshold of a grid follows
from those readings. Chosen: the smallest threshold at which every set reads within
``--tolerance`` points of fp32 (the fewest crops read twice). Written to the manifest:
``defaults.int8_recheck`` (the threshold, the figures per set, the sets, whether this CPU's
int8 products saturate) and, unless ``--no-default``, ``defaults.cpu_precision = "int8+fp32"``
(``--precision auto`` on a CPU). A later ``export.onnx --precision int8`` removes the threshold
(it belongs to that graph). On an x86 CPU without VNNI, where the bundle has an int8 image
encoder made for such CPUs (``export.onnx --no-vnni``), that graph is the one read and its
threshold goes to ``defaults.int8_no_vnni_recheck``.
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
from runtime import backends
from runtime.backends import RECHECK_KEYS, RECHECKED, int8_variant
from runtime.bundle import load_bundle
from runtime.charset import WordAccuracy, keep_for_eval
from runtime.inputs import InputError, Sample, open_labelled
from runtime.recognizer import Recognizer

#: thresholds tried, in order (the first that holds is chosen)
GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


class RecheckError(RuntimeError):
    """Validation sets or a bundle that cannot give a threshold."""


@dataclass
class SetReadings:
    """One validation set read three ways (same order as ``labels``)."""

    name: str
    labels: list[str]
    fp32: list[str]
    int8: list[str]
    int8_ctc_confidence: list[float]
    int8_ctc_empty: list[bool]

    def accuracy(self, texts: Sequence[str]) -> float:
        score = WordAccuracy()
        score.update(texts, self.labels)
        return score.accuracy

    def again(self, below: float) -> list[bool]:
        """Which crops ``int8+fp32`` reads again at threshold ``below``."""
        return [e or c < below for e, c in zip(self.int8_ctc_empty, self.int8_ctc_confidence)]

    def rechecked(self, below: float) -> list[str]:
        return [f if a else i for f, i, a in zip(self.fp32, self.int8, self.again(below))]


def labelled_samples(path: str) -> tuple[str, list[Sample]]:
    """A labelled set's name and its scored samples (the evaluation label policy)."""
    try:
        opened = open_labelled(path)
    except InputError as exc:
        raise RecheckError(str(exc)) from None
    samples = [s for s in opened.samples if s.label is not None and keep_for_eval(s.label)]
    if not samples:
        raise RecheckError(f"{path}: no labelled crops")
    return str(opened.name or path), samples


def read_three_ways(bundle_dir: Path, sets: Sequence[str], threads: int | None = None,
                    batch_size: int = 32) -> list[SetReadings]:
    """Each set read in fp32 and int8 (the bundle's decode mode, no LLM) and by the int8 CTC head."""
    opened = [labelled_samples(s) for s in sets]
    readers = {
        "fp32": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="fp32", threads=threads),
        "int8": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="int8", threads=threads),
        "ctc": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="int8", threads=threads,
                                      decode="ctc"),
    }
    out = []
    try:
        for name, samples in opened:
            results = {key: r.read(samples, batch_size=batch_size) for key, r in readers.items()}
            failed = [r.error for rs in results.values() for r in rs if not r.ok]
            if failed:
                raise RecheckError(f"{name}: {len(failed)} crop(s) could not be read ({failed[0]})")
            out.append(SetReadings(name, [str(s.label) for s in samples],
                                   [r.text for r in results["fp32"]], [r.text for r in results["int8"]],
                                   [float(r.confidence) for r in results["ctc"]],
                                   [not r.text for r in results["ctc"]]))
    finally:
        for reader in readers.values():
            reader.close()
    return out


def choose_threshold(readings: Sequence[SetReadings], tolerance: float,
                     grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The first threshold of ``grid`` at which every set reads within ``tolerance`` points
    of fp32, with the figures of every threshold tried; ``RecheckError`` when none does."""
    tried = []
    for below in grid:
        per_set = {}
        for r in readings:
            fp32, mixed = r.accuracy(r.fp32), r.accuracy(r.rechecked(below))
            per_set[r.name] = {"n": len(r.labels), "fp32": round(fp32, 3), "int8": round(r.accuracy(r.int8), 3),
                               "int8+fp32": round(mixed, 3),
                               "read_again_pct": round(100.0 * sum(r.again(below)) / len(r.labels), 2)}
        holds = all(s["fp32"] - s["int8+fp32"] <= tolerance + 1e-9 for s in per_set.values())
        tried.append({"below_confidence": below, "holds": holds, "sets": per_set})
        if holds:
            return {"below_confidence": below, "tolerance": tolerance, "sets": per_set, "tried": tried}
    raise RecheckError(f"no threshold up to {grid[-1]} keeps every set within {tolerance} points of fp32 "
                       f"(at {grid[-1]}: " + ", ".join(f"{k} {v['int8+fp32']} vs {v['fp32']}"
                                                     for k, v in tried[-1]["sets"].items()) + ")")


def write_recheck(bundle_dir: Path, choice: dict[str, Any], validation: Sequence[str], default: bool) -> dict[str, Any]:
    """Record ``choice`` in the manifest's ``defaults`` (and make it the CPU default), under the
    key of the int8 image encoder this CPU reads (``runtime.backends.int8_variant``)."""
    key = RECHECK_KEYS[int8_variant(load_bundle(bundle_dir, verify=False))]
    manifest = read_manifest(bundle_dir)
    defaults = manifest.setdefault("defaults", {})
    defaults[key] = {
        "below_confidence": choice["below_confidence"], "tolerance": choice["tolerance"],
        "validation": list(validation), "sets": choice["sets"], "cpu_saturates": backends.int8_dot_saturates(),
        "chosen_by": "python -m export.recheck", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if default:
        defaults["cpu_precision"] = RECHECKED
    return write_manifest(bundle_dir, manifest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.recheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory with fp32 and int8 graphs (changed in place)")
    parser.add_argument("--validation", nargs="+", required=True, metavar="SET",
                        help="labelled validation sets (carved from the training data, never an eval set)")
    parser.add_argument("--tolerance", type=float, default=0.2,
                        help="accuracy points int8+fp32 may lose against fp32 on each set (default 0.2)")
    parser.add_argument("--no-default", action="store_true",
                        help="record the threshold but keep the bundle's CPU precision")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--json", action="store_true", help="print the choice as one JSON line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bundle_dir = Path(args.bundle)
    try:
        bundle = load_bundle(bundle_dir)
        missing = [p for p in ("fp32", "int8") if p not in bundle.precisions]
        if missing:
            raise RecheckError(f"{bundle_dir}: no {' or '.join(missing)} graphs "
                               "(python -m export.onnx BUNDLE --precision int8 writes int8)")
        if args.tolerance < 0:
            raise RecheckError(f"--tolerance {args.tolerance}: must be at least 0")
        choice = choose_threshold(read_three_ways(bundle_dir, args.validation, args.threads), args.tolerance)
    except (RecheckError, OSError, ValueError) as exc:
        print(f"export.recheck: {exc}", file=sys.stderr)
        return 2
    write_recheck(bundle_dir, choice, args.validation, not args.no_default)
    for below_entry in choice["tried"]:
        sets = ", ".join(f"{k} {v['int8+fp32']:.2f} (fp32 {v['fp32']:.2f}, again {v['read_again_pct']:.1f}%)"
                         for k, v in below_entry["sets"].items())
        print(f"below {below_entry['below_confidence']}: {sets}", file=sys.stderr)
    summary = {k: v for k, v in choice.items() if k != "tried"}
    key = RECHECK_KEYS[int8_variant(bundle)]
    print(json.dumps(summary) if args.json else f"int8+fp32: crops below CTC confidence "
          f"{choice['below_confidence']} read again in fp32 (defaults.{key} in {bundle_dir / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
