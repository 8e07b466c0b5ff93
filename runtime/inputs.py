"""What the runtime reads: single images, folders of images and labelled sets.

A command-line INPUT is an image file, a directory of images (its subfolders too with
``recursive``; what is skipped is counted in the set's ``notes``), or a labelled set: a folder
with ``images/`` and ``labels.tsv``, a ``.tsv`` label file (``filename<TAB>label``), or
an LMDB directory (``data.mdb``) in the standard layout (``num-samples``,
``image-%09d``, ``label-%09d``, 1-indexed). The ``lmdb`` package is needed only for
LMDB sets and is imported when one is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from runtime.preprocess import ImageError, ImageSource

#: File name endings treated as images when a directory is listed.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                            ".pgm", ".pbm", ".jp2"})
Source = ImageSource | np.ndarray


class InputError(ValueError):
    """An INPUT that cannot be listed (unreadable label file, broken LMDB, ...)."""


@dataclass
class Sample:
    """One thing to read: a display name, the data and, in a labelled set, the label."""

    source: str
    data: Source
    label: str | None = None


@dataclass
class InputSet:
    """Samples from one INPUT; ``name`` is None for loose image files."""

    name: str | None
    samples: Sequence[Sample]
    labelled: bool = False
    #: what listing it left out, one line each (files that are not images, subfolders)
    notes: list[str] = field(default_factory=list)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A numpy image (H,W), (H,W,1), (H,W,3) or (H,W,4); uint8, uint16, bool or float in [0, 1]."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ImageError(f"array of shape {a.shape} is not an image (want HxW, HxWx3 or HxWx4)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("array image has NaN or infinite values")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"array image of dtype {a.dtype} is not supported (uint8, uint16, bool, float)")
    return Image.fromarray(np.ascontiguousarray(a))


def source_name(item: Any, index: int) -> str:
    """A display name for an input passed to :meth:`Recognizer.read`."""
    if isinstance(item, Sample):
        return item.source
    if isinstance(item, str | os.PathLike):
        return str(item)
    kind = {bytes: "bytes", bytearray: "bytes", np.ndarray: "array"}.get(type(item), "image")
    return f"<{kind} {index}>"


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def read_tsv(path: Path) -> InputSet:
    """A ``filename<TAB>label`` file; names are relative to ``images/`` beside it when that
    folder exists, else to the file's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the label file ({exc})") from None
    base = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, sep, label = line.partition("\t")
        if not sep:
            raise InputError(f"{path}:{number}: expected 'filename<TAB>label'")
        image = base / name
        samples.append(Sample(str(image), image, label))
    name = path.parent.name if path.stem == "labels" else f"{path.parent.name}/{path.stem}"
    return InputSet(name, samples, labelled=True)


_LMDB_ENVS: dict[str, Any] = {}


class LmdbSamples(Sequence[Sample]):
    """The samples of an LMDB set, read on access (``image-%09d``/``label-%09d``, 1-indexed)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import lmdb
        except ImportError:
            raise InputError(f"{path}: reading an LMDB set needs the lmdb package (pip install lmdb)") from None
        self.path = Path(path)
        key = str(self.path.resolve())
        try:
            if key not in _LMDB_ENVS:  # lmdb allows one open environment per path and process
                _LMDB_ENVS[key] = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                                            max_readers=8)
            self.env = _LMDB_ENVS[key]
            with self.env.begin() as txn:
                count = txn.get(b"num-samples")
        except lmdb.Error as exc:
            raise InputError(f"{path}: cannot open the LMDB set ({exc})") from None
        if count is None:
            raise InputError(f"{path}: LMDB set has no 'num-samples' key")
        try:
            self.count = int(count.decode())
        except ValueError:
            raise InputError(f"{path}: LMDB 'num-samples' is not a number ({count[:20]!r})") from None

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        key = index % self.count + 1
        with self.env.begin() as txn:
            image = txn.get(b"image-%09d" % key)
            label = txn.get(b"label-%09d" % key)
        source = f"{self.path}#{key}"
        text = label.decode("utf-8", errors="replace") if label is not None else None
        return Sample(source, bytes(image) if image is not None else b"", text)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.count):
            yield self[i]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def list_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[str]]:
    """The image files of ``folder`` (and of its subfolders when ``recursive``), sorted, and
    a note of what was skipped (files that are not images, subfolders not read)."""
    images: list[Path] = []
    other = folders = 0
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for entry in entries:
        if entry.is_dir():
            folders += 0 if recursive else 1
        elif _is_image_file(entry):
            images.append(entry)
        else:
            other += 1
    skipped = []
    if other:
        skipped.append(f"{_plural(other, 'file')} with no image suffix")
    if folders:
        skipped.append(f"{_plural(folders, 'subfolder')} (--recursive reads them)")
    notes = [f"{folder}: skipped {' and '.join(skipped)}"] if skipped else []
    return sorted(images), notes


def open_input(path: str | Path, recursive: bool = False) -> InputSet:
    """The samples of one INPUT (see the module docstring); :class:`InputError` for a path
    that does not exist (an image a label file names but that is missing is a sample, and
    fails when it is read)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "data.mdb").is_file():
            return InputSet(p.name, LmdbSamples(p), labelled=True)
        if (p / "labels.tsv").is_file():
            return read_tsv(p / "labels.tsv")
        images, notes = list_images(p, recursive)
        return InputSet(None, [Sample(str(f), f) for f in images], notes=notes)
    if p.suffix.lower() == ".tsv" and p.is_file():
        return read_tsv(p)
    return InputSet(None, [Sample(str(p), p)])


def collect_inputs(paths: Sequence[str | Path], recursive: bool = False) -> list[InputSet]:
    """Open every INPUT; loose files are gathered into one unnamed set (with the notes of
    the folders they came from, even when nothing was found in them)."""
    sets: list[InputSet] = []
    loose: list[Sample] = []
    notes: list[str] = []
    for path in paths:
        opened = open_input(path, recursive)
        if opened.name is None:
            loose.extend(opened.samples)
            notes.extend(opened.notes)
        else:
            sets.append(opened)
    return ([InputSet(None, loose, notes=notes)] if loose or notes else []) + sets


def open_labelled(path: str | Path) -> InputSet:
    """:func:`open_input` for a labelled set; :class:`InputError` when ``path`` is not one."""
    opened = open_input(path)
    if not opened.labelled:
        raise InputError(f"{path}: not a labelled set (a folder with images/ and labels.tsv, a labels .tsv "
                         "or an LMDB folder)")
    return opened
