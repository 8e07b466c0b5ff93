"""Choose the bundle's ``int8+fp32`` threshold on validation sets and write it to the manifest.

    python -m export.recheck BUNDLE --validation SET... [--tolerance 0.2] [--no-default]
                             [--max-time 1.0] [--threads N] [--json]

``--precision int8+fp32`` reads every crop with the int8 graphs and encodes again in fp32
the crops whose int8 CTC reading is empty or less confident than a threshold
(:class:`runtime.backends.RecheckedBackend`). This reads each validation SET (labelled crops
carved from the training data, never an eval set) three ways through the runtime, in the
bundle's decode mode: fp32, int8, and the int8 CTC confidence of each crop. Since a crop read
again goes through exactly the fp32 path, the accuracy at every threshold of a grid follows
from those readings. Chosen: the smallest threshold at which every set reads within
``--tolerance`` points of fp32 (the fewest crops read twice). Written to the manifest:
``defaults.int8_recheck`` (the threshold, the figures per set, the sets, whether this CPU's
int8 products saturate, the expected cost) and, unless ``--no-default``,
``defaults.cpu_precision = "int8+fp32"`` (``--precision auto`` on a CPU) when it pays: a crop
read again costs a second, fp32, encoding, so the int8 image encoder's time against fp32's
(measured here, interleaved) plus the share of validation crops read again must stay below
``--max-time`` (default 1.0: expected faster than fp32); otherwise the CPU default stays as it
was, or fp32 (on a hard domain most crops are unsure, and int8+fp32 would read most of them
twice: slower than fp32). A later ``export.onnx --precision int8`` removes the threshold
(it belongs to that graph). On an x86 CPU without VNNI, where the bundle has an int8 image
encoder made for such CPUs (``export.onnx --no-vnni``), that graph is the one read and its
threshold goes to ``defaults.int8_no_vnni_recheck``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from runtime.recognizer import ReadResult, Recognizer

#: thresholds tried, in order (the first that holds is chosen)
GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
#: crops of the first validation set timed for the encoders' time ratio, and rounds (median)
TIMED_CROPS = 64
TIMING_ROUNDS = 3


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


def read_every_way(readers: dict[str, Recognizer], name: str, samples: list[Sample],
                   batch_size: int = 32) -> dict[str, list[ReadResult]]:
    """``samples`` read by each of ``readers``; :class:`RecheckError` when a crop could not be read
    (a validation set must be read whole, or its figures mean nothing)."""
    results = {key: reader.read(samples, batch_size=batch_size) for key, reader in readers.items()}
    failed = [r.error for rs in results.values() for r in rs if not r.ok]
    if failed:
        raise RecheckError(f"{name}: {len(failed)} crop(s) could not be read ({failed[0]})")
    return results


def read_three_ways(bundle_dir: Path, sets: Sequence[str], threads: int | None = None,
                    batch_size: int = 32) -> tuple[list[SetReadings], float]:
    """Each set read in fp32 and int8 (the bundle's decode mode, no LLM) and by the int8 CTC
    head; and the int8 image encoder's time against fp32's (:func:`encoder_time_ratio`)."""
    opened = [labelled_samples(s) for s in sets]
    readers = {
        "fp32": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="fp32", threads=threads,
                                       views="off", specialist="off"),
        "int8": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="int8", threads=threads,
                                       views="off", specialist="off"),
        "ctc": Recognizer.from_bundle(bundle_dir, backend="ort-cpu", llm="none", precision="int8", threads=threads,
                                      decode="ctc", views="off", specialist="off"),
    }
    out = []
    try:
        for name, samples in opened:
            results = read_every_way(readers, name, samples, batch_size)
            out.append(SetReadings(name, [str(s.label) for s in samples],
                                   [r.text for r in results["fp32"]], [r.text for r in results["int8"]],
                                   [float(r.confidence) for r in results["ctc"]],
                                   [not r.text for r in results["ctc"]]))
        ratio = encoder_time_ratio(readers["fp32"], readers["int8"], opened[0][1][:TIMED_CROPS], batch_size)
    finally:
        for reader in readers.values():
            reader.close()
    return out, ratio


def encoder_time_ratio(fp32: Recognizer, int8: Recognizer, samples: Sequence[Sample], batch_size: int = 32,
                       rounds: int = TIMING_ROUNDS) -> float:
    """The int8 image encoder's time over fp32's on ``samples`` (the recognizers' own stage
    timings; the two read in turn, after a warm-up; the median of ``rounds``)."""
    def encoder_ms(reader: Recognizer) -> float:
        return sum(r.timings_ms.get("image_encoder", 0.0) for r in reader.read(samples, batch_size=batch_size))

    encoder_ms(fp32), encoder_ms(int8)
    ratios = []
    for _ in range(rounds):
        base = encoder_ms(fp32)
        ratios.append(encoder_ms(int8) / base if base > 0 else 1.0)
    return float(statistics.median(ratios))


def expected_cost(choice: dict[str, Any], ratio: float) -> dict[str, float]:
    """What ``int8+fp32`` at ``choice``'s threshold is expected to cost: the int8 image
    encoder's time against fp32's (``ratio``) plus the share of the validation crops read
    again (each a second, fp32, encoding), pooled over the sets."""
    sets = choice["sets"].values()
    crops = sum(s["n"] for s in sets)
    again = sum(s["n"] * s["read_again_pct"] for s in sets) / (100.0 * crops) if crops else 0.0
    return {"int8_encoder_vs_fp32": round(ratio, 3), "read_again": round(again, 4),
            "int8+fp32_encoding_vs_fp32": round(ratio + again, 3)}


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


def write_recheck(bundle_dir: Path, choice: dict[str, Any], validation: Sequence[str], default: bool,
                  cost: dict[str, float] | None = None, max_time: float = 1.0) -> dict[str, Any]:
    """Record ``choice`` (and its expected ``cost``, :func:`expected_cost`) in the manifest's
    ``defaults``, under the key of the int8 image encoder this CPU reads
    (``runtime.backends.int8_variant``); with ``default``, make ``int8+fp32`` the CPU default
    when the cost is below ``max_time``, else drop a CPU default of ``int8+fp32``."""
    key = RECHECK_KEYS[int8_variant(load_bundle(bundle_dir, verify=False))]
    manifest = read_manifest(bundle_dir)
    defaults = manifest.setdefault("defaults", {})
    defaults[key] = {
        "below_confidence": choice["below_confidence"], "tolerance": choice["tolerance"],
        "validation": list(validation), "sets": choice["sets"], "cpu_saturates": backends.int8_dot_saturates(),
        **({"expected_cost": cost} if cost is not None else {}),
        "chosen_by": "python -m export.recheck", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if default:
        if pays(cost, max_time):
            defaults["cpu_precision"] = RECHECKED
        elif defaults.get("cpu_precision") == RECHECKED:
            del defaults["cpu_precision"]
    return write_manifest(bundle_dir, manifest)


def pays(cost: dict[str, float] | None, max_time: float) -> bool:
    """Whether ``int8+fp32`` is expected to encode in less than ``max_time`` times fp32's
    time (no cost known: assumed to)."""
    return cost is None or cost["int8+fp32_encoding_vs_fp32"] < max_time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.recheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory with fp32 and int8 graphs (changed in place)")
    parser.add_argument("--validation", nargs="+", required=True, metavar="SET",
                        help="labelled validation sets (carved from the training data, never an eval set)")
    parser.add_argument("--tolerance", type=float, default=0.2,
                        help="accuracy points int8+fp32 may lose against fp32 on each set (default 0.2)")
    parser.add_argument("--no-default", action="store_true",
                        help="record the threshold but keep the bundle's CPU precision")
    parser.add_argument("--max-time", type=float, default=1.0, metavar="RATIO",
                        help="int8+fp32 becomes the CPU default only when its expected image encoding time "
                             "(int8's, plus fp32's for the crops read again) is below RATIO times fp32's "
                             "(default 1.0)")
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
        if not args.max_time > 0:
            raise RecheckError(f"--max-time {args.max_time}: must be above 0")
        readings, ratio = read_three_ways(bundle_dir, args.validation, args.threads)
        choice = choose_threshold(readings, args.tolerance)
    except (RecheckError, OSError, ValueError) as exc:
        print(f"export.recheck: {exc}", file=sys.stderr)
        return 2
    cost = expected_cost(choice, ratio)
    write_recheck(bundle_dir, choice, args.validation, not args.no_default, cost, args.max_time)
    for below_entry in choice["tried"]:
        sets = ", ".join(f"{k} {v['int8+fp32']:.2f} (fp32 {v['fp32']:.2f}, again {v['read_again_pct']:.1f}%)"
                         for k, v in below_entry["sets"].items())
        print(f"below {below_entry['below_confidence']}: {sets}", file=sys.stderr)
    summary = {**{k: v for k, v in choice.items() if k != "tried"}, "expected_cost": cost,
               "cpu_default": not args.no_default and pays(cost, args.max_time)}
    key = RECHECK_KEYS[int8_variant(bundle)]
    if not pays(cost, args.max_time):
        print(f"export.recheck: int8+fp32 would read {100 * cost['read_again']:.1f}% of the validation crops twice: "
              f"its image encoding is expected to take {cost['int8+fp32_encoding_vs_fp32']:.2f}x fp32's (int8 alone "
              f"{cost['int8_encoder_vs_fp32']:.2f}x, measured here), so it is not made the CPU default; "
              "--precision int8+fp32 reads with this threshold", file=sys.stderr)
    print(json.dumps(summary) if args.json else f"int8+fp32: crops below CTC confidence "
          f"{choice['below_confidence']} read again in fp32 (defaults.{key} in {bundle_dir / 'manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
