"""The crops static INT8 is calibrated and chosen on, all from the training sets.

    python -m benchmarks.int8_sets [-o runs/int8] [--calibration 320] [--dev 500] [--check 0] [--seed 0]

Writes label files with absolute image paths (the images stay in ../shared/data):

* ``val_real.tsv``: the default model's validation split (the 5% its training held out,
  scene text only; ``benchmarks.correction.carve_val_real``): the first dev set;
* ``train_dev.tsv``: a seeded sample of the other real scene-text training crops: the
  second dev set (the model trained on them; what it shows is how far INT8 moves away
  from FP32);
* ``calibration.tsv``: another seeded sample of those crops, disjoint from both;
* ``check.tsv`` (with ``--check N``): a third dev set from the same crops, disjoint from the
  three above; larger sets see smaller losses (on 348 crops one crop is 0.29 points).

The sample is one seeded order, cut in turn: ``train_dev``, ``calibration``, ``check``; so a
larger ``--check`` leaves the other sets as they were.

No evaluation set is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.correction import BORN_DIGITAL, TRAIN, TRAIN_SETS, carve_val_real


def _write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = [f"{TRAIN / name / 'images' / file}\t{label}\n" for name, file, label in rows]
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_sets", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/int8"))
    parser.add_argument("--calibration", type=int, default=320, help="calibration crops (default 320)")
    parser.add_argument("--dev", type=int, default=500, help="crops of train_dev (default 500)")
    parser.add_argument("--check", type=int, default=0, help="crops of check.tsv, a third dev set (default 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not TRAIN.is_dir():
        print(f"error: no training data at {TRAIN}", file=sys.stderr)
        return 2
    from runtime.inputs import read_tsv

    val = carve_val_real(args.output)
    held = {(s, f) for s, f, _ in val}
    rest: list[tuple[str, str, str]] = []
    for name in TRAIN_SETS:
        if name == BORN_DIGITAL:
            continue
        for sample in read_tsv(TRAIN / name / "labels.tsv").samples:
            file = Path(sample.source).name
            if (name, file) not in held and sample.label:
                rest.append((name, file, sample.label))
    order = np.random.default_rng(args.seed).permutation(len(rest))
    dev = [rest[i] for i in order[: args.dev]]
    end = args.dev + args.calibration
    calibration = [rest[i] for i in order[args.dev: end]]
    check = [rest[i] for i in order[end: end + args.check]]
    if len(check) < args.check:
        print(f"warning: only {len(check)} crops left for check.tsv", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
    sets = [("val_real", val), ("train_dev", dev), ("calibration", calibration)]
    if args.check:
        sets.append(("check", check))
    for name, rows in sets:
        _write(args.output / f"{name}.tsv", rows)
        print(f"{args.output / name}.tsv: {len(rows)} crops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
