"""The decode modes against each other on labelled sets: accuracy, time per crop and how many
texts differ from the first mode's.

    python -m benchmarks.decode_modes SET... [--modes full,cascade,ctc] [--llm none|default|PATH]
        [--engine DIR] [--batch 32] [--threads 1]

Each set is read by every mode in turn (one recognizer per mode, built once), so the modes see
the same crops under the same load. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks.common import load_sets, markdown_table
from runtime.charset import WordAccuracy
from runtime.ctc_reading import DECODE_MODES
from runtime.inputs import InputError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", metavar="SET")
    parser.add_argument("--modes", default="full,cascade,ctc")
    parser.add_argument("--llm", default="none", help="none, default (the embedded model) or a GGUF path")
    parser.add_argument("--engine", default=None, help="bundle directory (default: the embedded bundle)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in DECODE_MODES for m in modes):
        print(f"error: --modes: choose from {', '.join(DECODE_MODES)}", file=sys.stderr)
        return 2
    try:
        sets = load_sets(args.sets)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    empty = next((s.path for s in sets if not s.images), None)
    if empty is not None:
        print(f"error: {empty}: no readable labelled crop", file=sys.stderr)
        return 2
    from runtime.recognizer import Recognizer

    llm = None if args.llm == "default" else args.llm
    readers = {m: Recognizer.from_bundle(args.engine, llm=llm, threads=args.threads, decode=m) for m in modes}
    rows = []
    for labelled in sets:
        texts: dict[str, list[str]] = {}
        row = [f"{labelled.path} ({len(labelled.images)})"]
        for mode, reader in readers.items():
            start = time.perf_counter()
            results = reader.read(labelled.images, batch_size=args.batch)
            ms = 1000.0 * (time.perf_counter() - start) / len(labelled.images)
            accuracy = WordAccuracy()
            texts[mode] = [r.text or "" for r in results]
            accuracy.update(texts[mode], labelled.labels)
            differ = sum(a != b for a, b in zip(texts[mode], texts[modes[0]]))
            row.append(f"{accuracy.as_dict()['accuracy']:.2f} / {ms:.1f} / {differ}")
        rows.append(row)
        print(f"{labelled.path}: {row[1:]}", file=sys.stderr, flush=True)
    header = ["set"] + [f"{m}: accuracy / ms per crop / texts unlike {modes[0]}" for m in modes]
    print(markdown_table(header, rows))
    for reader in readers.values():
        reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
