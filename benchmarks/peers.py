"""This project against the offline OCR readers people use today, on the same crops.

    python -m benchmarks.peers SET... [--engine BUNDLE] [--json] [--limit N] [--readers ...]

A SET is a folder with ``images/`` + ``labels.tsv`` or a labels ``.tsv`` (images in the
``images/`` folder beside it). Every reader sees every crop at batch 1, interleaved: for
each image each reader runs in turn (the order rotating from image to image), so machine
noise hits all of them alike. With ``--isolated`` each reader runs in a process of its own
(``benchmarks.isolated``: no reader's thread pools meet another's; the parent still sends
one crop at a time) and is timed inside that process. Accuracy is the protocol's (lower case, ``[0-9a-z]``, labels
over 25 characters dropped); time is milliseconds per crop, reported as median and p95
and as the median of per-image ratios to the baseline reader. A reader that cannot run
here is reported as missing, not scored. ``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    EvalSet,
    clean_nan,
    fmt,
    load_sets,
    machine,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    percentile,
    print_json,
    rotate,
)
from benchmarks.readers import LOADERS, ONE_VIEW, PEERS, PROJECT, Missing, Reader, load_project
from runtime.backends import PRECISION_CHOICES
from runtime.charset import WordAccuracy, weighted_total
from runtime.inputs import InputError

#: another bundle of this project (``--other-engine``), e.g. the previous default model
OTHER = "other-bundle"
ALL_READERS = PROJECT + (ONE_VIEW,) + PEERS + (OTHER,)
DEFAULT_READERS = PROJECT + PEERS
#: Row names of readers that did not load.
NAMES = {"project": "this project (no LLM)", "project+llm": "this project + LLM",
         "project+lexicon": "this project + lexicon (no LLM)",
         ONE_VIEW: "this project, one view (no LLM)", "rapidocr": "RapidOCR PP-OCRv4 rec",
         "rapidocr3": "RapidOCR 3 PP-OCRv6 rec", OTHER: "another bundle (no LLM)",
         "tesseract": "Tesseract LSTM, PSM 7", "easyocr": "EasyOCR english_g2"}


def load_readers(keys: Sequence[str], args: argparse.Namespace) -> tuple[list[Reader], dict[str, str]]:
    """The readers that load, and ``{key: reason}`` for those that do not."""
    readers, missing = [], {}
    for key in keys:
        try:
            if key in PROJECT:
                llm = {"project+llm": args.llm, "project+lexicon": "lexicon"}.get(key)
                reader = load_project(args.engine, llm=llm,
                                      llm_mode=args.llm_mode, threads=args.threads, backend=args.backend,
                                      precision=getattr(args, "precision", None))
            elif key == ONE_VIEW:
                reader = load_project(args.engine, threads=args.threads, backend=args.backend,
                                      precision=getattr(args, "precision", None), views="off")
            elif key == OTHER:
                if not args.other_engine:
                    raise Missing("no --other-engine given")
                reader = load_project(args.other_engine, threads=args.threads, backend=args.backend)
                reader.key, reader.name = OTHER, f"{reader.name} [{Path(args.other_engine).name}]"
            else:
                reader = LOADERS[key](threads=args.threads)
        except Missing as exc:
            missing[key] = str(exc)
            print(f"{key}: skipped: {exc}", file=sys.stderr)
            continue
        readers.append(reader)
    return readers, missing


def run_set(readers: Sequence[Reader], data: EvalSet, warmup: int, offset: int = 0) -> dict[str, dict[str, Any]]:
    """Every reader on every image of ``data``, interleaved per image.

    Returns per reader key: ``texts``, ``ms`` (NaN where the reader failed) and ``errors``.
    """
    out = {r.key: {"texts": [], "ms": [], "errors": 0, "first_error": None} for r in readers}
    for image in data.images[:warmup]:  # untimed: lazy initialisation, caches
        for reader in readers:
            with contextlib.suppress(Exception):  # a failing warm-up shows up again when timed
                reader.read(image)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one reader's timing would bill it alone
    try:
        for i, image in enumerate(data.images):
            for reader in rotate(readers, offset + i):
                entry = out[reader.key]
                start = time.perf_counter()
                try:
                    text = reader.read(image)
                    elapsed = 1000.0 * (time.perf_counter() - start)
                    elapsed = getattr(reader, "last_ms", None) or elapsed  # timed in its own process
                except Exception as exc:  # one failure: that reader's answer is empty
                    text, elapsed = "", float("nan")
                    entry["errors"] += 1
                    entry["first_error"] = entry["first_error"] or f"{type(exc).__name__}: {exc}"
                entry["texts"].append(text)
                entry["ms"].append(elapsed)
            if i % 64 == 63:
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def summarise(readers: Sequence[Reader], missing: dict[str, str], sets: Sequence[EvalSet],
              runs: list[dict[str, dict[str, Any]]], baseline: str | None) -> dict[str, Any]:
    """Accuracy per set and in total, times and ratios, per reader (missing ones listed)."""
    rows: list[dict[str, Any]] = []
    base_ms = [t for run in runs for t in run[baseline]["ms"]] if baseline else []
    for reader in readers:
        per_set, all_ms = {}, []
        for data, run in zip(sets, runs):
            entry = run[reader.key]
            meter = WordAccuracy()
            meter.update(entry["texts"], data.labels)
            ok = [t for t in entry["ms"] if t == t]
            per_set[data.name] = {**meter.as_dict(), "median_ms": median(ok), "p95_ms": percentile(ok, 95),
                                  "errors": entry["errors"], "first_error": entry["first_error"]}
            if baseline:
                per_set[data.name]["ratio_to_baseline"] = _ratio(entry["ms"], run[baseline]["ms"])
            all_ms += entry["ms"]
        total = weighted_total(list(per_set.values()))
        ok = [t for t in all_ms if t == t]
        total.update(median_ms=median(ok), p95_ms=percentile(ok, 95),
                     errors=sum(s["errors"] for s in per_set.values()))
        if baseline:
            total["ratio_to_baseline"] = _ratio(all_ms, base_ms)
        rows.append({"key": reader.key, "name": reader.name, "status": "ok", "version": reader.version,
                     "info": reader.info, "sets": per_set, "total": total})
    for key, reason in missing.items():
        rows.append({"key": key, "name": NAMES.get(key, key), "status": "missing", "reason": reason})
    return {"baseline": baseline, "readers": rows}


def _ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """Median per-image ratio, over the images both readers read without failing."""
    pairs = [(t, b) for t, b in zip(times, baseline, strict=True) if t == t and b == b]
    return paired_ratio([p[0] for p in pairs], [p[1] for p in pairs])


def table(summary: dict[str, Any], sets: Sequence[EvalSet]) -> str:
    """The markdown table: accuracy per set and in total, 1 - NED, times, time ratio."""
    baseline = summary["baseline"]
    header = ["reader", "version", *[f"{s.name} (n={len(s)})" for s in sets], "total acc %", "total 1-NED %",
              "median ms/crop", "p95 ms/crop", f"time vs {baseline or '-'}"]
    rows = []
    for row in summary["readers"]:
        if row["status"] != "ok":
            rows.append([row["name"], "missing", *["-"] * (len(header) - 2)])  # never scored as zero
            continue
        total = row["total"]
        rows.append([row["name"], row["version"], *[fmt(row["sets"][s.name]["accuracy"]) for s in sets],
                     fmt(total["accuracy"]), fmt(total["ned"]), fmt(total["median_ms"]), fmt(total["p95_ms"]),
                     fmt(total.get("ratio_to_baseline"), 2, "x")])
    notes = [f"- {r['key']}: missing: {r['reason']}" for r in summary["readers"] if r["status"] != "ok"]
    notes += [f"- {r['name']}: {r['total']['errors']} crops failed (counted wrong)"
              for r in summary["readers"] if r["status"] == "ok" and r["total"]["errors"]]
    return markdown_table(header, rows) + ("\n\n" + "\n".join(notes) if notes else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", metavar="SET", help="labelled set: folder or labels .tsv")
    parser.add_argument("--engine", help="this project's bundle (default: runtime/assets/default_bundle)")
    parser.add_argument("--readers", nargs="+", choices=ALL_READERS, default=list(DEFAULT_READERS),
                        help=f"readers to run (default: all but {OTHER})")
    parser.add_argument("--other-engine", help=f"a second bundle of this project, the {OTHER} reader "
                                               "(e.g. a previous default model), no LLM")
    parser.add_argument("--baseline", help="reader key the time ratios refer to "
                                           "(default: project if it runs, else the first that runs)")
    parser.add_argument("--llm", default="default", help="GGUF for project+llm: default or a path")
    parser.add_argument("--llm-mode", default="rescore", choices=("rescore", "fill"))
    parser.add_argument("--backend", default="auto", help="this project's backend (auto, ort-cpu, ...)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES,
                        help="this project's precision (default: auto, the bundle's CPU precision)")
    parser.add_argument("--threads", type=int, help="threads per reader (default: each library's own)")
    parser.add_argument("--limit", type=int, help="first N crops of each set (after the protocol's filter)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed crops per reader first (default 3)")
    parser.add_argument("--isolated", action="store_true",
                        help="each reader in a process of its own (timed there; still one crop at a time)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        sets = load_sets(args.sets, args.limit)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = machine()
    if args.isolated:
        from benchmarks.isolated import load_isolated

        readers, missing = load_isolated(args.readers, args)
    else:
        readers, missing = load_readers(args.readers, args)
    if not readers:
        print("error: no reader could run", file=sys.stderr)
    keys = [r.key for r in readers]
    baseline = args.baseline or next((k for k in ("project", *keys) if k in keys), None)
    if baseline is not None and baseline not in keys:
        print(f"error: baseline {baseline!r} is not among the readers that run ({', '.join(keys)})",
              file=sys.stderr)
        return 2
    runs, offset = [], 0
    try:
        for data in sets:
            print(f"{data.name}: {len(data)} crops x {len(readers)} readers", file=sys.stderr)
            runs.append(run_set(readers, data, args.warmup, offset))
            offset += len(data)
    finally:
        for reader in readers:
            reader.close()
    summary = summarise(readers, missing, sets, runs, baseline)
    print(machine_line(info))
    print()
    print(table(summary, sets))
    if args.json:
        document = {"benchmark": "peers", "machine": info,
                    "sets": [{"name": s.name, "path": s.path, "n": len(s), "dropped": s.dropped,
                              "unreadable": len(s.unreadable or [])} for s in sets],
                    "settings": {"threads": args.threads, "warmup": args.warmup, "limit": args.limit,
                                 "batch": 1, "interleaved": True, "isolated": args.isolated}, **summary}
        print_json(clean_nan(document))
    return 0 if readers else 2


if __name__ == "__main__":
    sys.exit(main())
