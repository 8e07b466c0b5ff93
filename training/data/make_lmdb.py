"""Write a folder set as a scene-text LMDB.

    python -m training.data.make_lmdb SRC -o OUT_DIR [--no-check] [--overwrite]

SRC is a folder with ``labels.tsv`` (images in its ``images/``) or a labels ``.tsv`` file
(images in the sibling ``images/``). Image bytes are copied as they are (no re-encoding)
and labels are written raw: readers apply the label policy when they open the LMDB.
Unless ``--no-check``, every image is decoded first and unreadable ones are left out
and reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from runtime.preprocess import ImageError, load_image

from .lmdb_io import write_lmdb
from .readers import read_labels_tsv


def folder_samples(src: str | Path, check: bool = True,
                   skipped: list[tuple[str, str]] | None = None) -> Iterator[tuple[bytes, str]]:
    """``(encoded bytes, raw label)`` for each line of the labels file of ``src``."""
    src = Path(src)
    labels_file = src / "labels.tsv" if src.is_dir() else src
    if not labels_file.is_file():
        raise FileNotFoundError(f"{src}: no labels.tsv (give a folder with labels.tsv or a .tsv file)")
    entries = read_labels_tsv(labels_file)
    root = labels_file.parent / "images"
    if not root.is_dir():
        root = labels_file.parent
    for name, label in entries:
        path = root / name
        try:
            if check:
                load_image(path)
            elif not path.is_file():
                raise ImageError(f"{path}: no such file")
            data = path.read_bytes()
        except (ImageError, OSError) as exc:
            if skipped is not None:
                skipped.append((name, str(exc)))
            continue
        yield data, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.make_lmdb", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="folder with labels.tsv, or a labels .tsv file")
    parser.add_argument("-o", "--output", required=True, help="LMDB directory to write")
    parser.add_argument("--no-check", action="store_true", help="do not decode images before writing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing LMDB")
    args = parser.parse_args(argv)
    skipped: list[tuple[str, str]] = []
    try:
        count = write_lmdb(args.output, folder_samples(args.src, not args.no_check, skipped), args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, reason in skipped[:10]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"wrote {count} samples to {args.output}" + (f" ({len(skipped)} unreadable skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
