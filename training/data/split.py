"""Carve a validation split out of labelled folder sets.

    python -m training.data.split SRC... -o OUT [--val-fraction 0.05] [--seed 0]

For each SRC (a folder with ``images/`` and ``labels.tsv``) this writes
``OUT/<name>/train.tsv`` and ``OUT/<name>/val.tsv`` and links ``OUT/<name>/images`` to the
source images, so both files read like any labels ``.tsv`` (nothing is copied). The split
is deterministic for a seed. Benchmarks meant for reporting should never be split here:
choose checkpoints on the validation part of the *training* data.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from training.data.readers import read_labels_tsv


def split_set(src: str | os.PathLike, out: str | os.PathLike, val_fraction: float, seed: int) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``val.tsv`` for one folder set; returns their paths."""
    src, out = Path(src), Path(out)
    entries = read_labels_tsv(src / "labels.tsv")
    order = np.random.default_rng(seed).permutation(len(entries))
    n_val = int(round(len(entries) * val_fraction))
    val_index = set(order[:n_val].tolist())
    target = out / src.name
    target.mkdir(parents=True, exist_ok=True)
    link = target / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to((src / "images").resolve(), target_is_directory=True)
    paths = target / "train.tsv", target / "val.tsv"
    with paths[0].open("w", encoding="utf-8") as train, paths[1].open("w", encoding="utf-8") as val:
        for i, (name, label) in enumerate(entries):
            (val if i in val_index else train).write(f"{name}\t{label}\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="folder sets (images/ + labels.tsv)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for src in args.sources:
        train, val = split_set(src, args.output, args.val_fraction, args.seed)
        print(f"{src}: {sum(1 for _ in train.open())} train -> {train}, {sum(1 for _ in val.open())} val -> {val}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
