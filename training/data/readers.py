"""Labelled word-image sets: a folder with ``labels.tsv``, or a tree of scene-text LMDBs.

Every reader is a torch ``Dataset`` of ``(PIL RGB image, label)``, or of
``(transform(image), label)`` when a transform is given. Use :func:`open_set`, which
picks the reader from the path:

* a directory with ``labels.tsv`` (``filename<TAB>label``, UTF-8; images in its
  ``images/`` folder, or beside the file when there is none);
* a ``.tsv`` labels file (e.g. ``eval/ic13/labels_857.tsv``; images in the sibling
  ``images/`` folder);
* a directory holding one or more LMDBs anywhere below it (:mod:`.lmdb_io`); they are
  concatenated in sorted path order.

Labels (the one implementation is :mod:`runtime.charset`):

* ``train=True``: :func:`normalize_label` for ``charset``/``max_length``; labels it
  rejects (empty, too long) are dropped and counted (``num_dropped``).
* ``train=False`` (evaluation): labels are kept raw, except those the protocol drops
  (:func:`keep_for_eval`: longer than ``max_length``), also counted.

Broken images (missing, corrupt, not an image; decoding is
:func:`runtime.preprocess.load_image`):

* with ``verify=True`` (the default for evaluation) every image is decoded when the set
  is opened; unreadable ones are removed and listed in ``broken`` as ``(key, reason)``,
  so an evaluation reports exactly how many it skipped;
* otherwise (the default for training, where decoding a large LMDB up front is too slow)
  an unreadable image met during training is skipped with a ``UserWarning`` naming it
  and the next readable item is returned in its place (the set keeps its length; counts
  are per process: ``num_skipped``). In evaluation mode without verification an
  unreadable image raises :class:`runtime.preprocess.ImageError`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from runtime.charset import MAX_LABEL_LENGTH, keep_for_eval, normalize_label
from runtime.preprocess import ImageError, ImageSource, load_image

from . import lmdb_io

log = logging.getLogger("training.data")

Transform = Callable[[Image.Image], Any]
#: how many following items an unreadable training image may be replaced by
_MAX_SUBSTITUTES = 32


def select_label(raw: str, train: bool, charset: str, max_length: int) -> str | None:
    """The label a set keeps for ``raw``, or ``None`` when it is dropped (see module doc)."""
    if train:
        return normalize_label(raw, charset, max_length)
    return raw if keep_for_eval(raw, max_length) else None


class LabelledSet(Dataset):
    """Base class: labels in memory, images fetched by index (see the module doc)."""

    def __init__(self, name: str, train: bool, charset: str, max_length: int,
                 transform: Transform | None) -> None:
        self.name = name
        self.train = train
        self.charset = charset
        self.max_length = max_length
        self.transform = transform
        self.labels: list[str] = []
        self.num_raw = 0
        self.num_dropped = 0
        self.num_skipped = 0
        self.broken: list[tuple[str, str]] = []

    # subclasses provide these
    def source(self, index: int) -> ImageSource:
        """The image at ``index``: a path or encoded bytes."""
        raise NotImplementedError

    def key(self, index: int) -> str:
        """A name for the item at ``index`` (file name or LMDB key) for messages."""
        raise NotImplementedError

    def _subset(self, keep: np.ndarray) -> None:
        """Keep only the items whose positions are in ``keep``."""
        raise NotImplementedError

    # shared behaviour
    def _select(self, raw_labels: Sequence[str]) -> np.ndarray:
        """Apply the label policy; returns the positions kept and sets ``labels``."""
        kept, labels = [], []
        for i, raw in enumerate(raw_labels):
            label = select_label(raw, self.train, self.charset, self.max_length)
            if label is not None:
                kept.append(i)
                labels.append(label)
        self.labels = labels
        self.num_raw = len(raw_labels)
        self.num_dropped = self.num_raw - len(labels)
        return np.asarray(kept, dtype=np.int64)

    def verify(self) -> list[tuple[str, str]]:
        """Decode every image now; drop the unreadable ones and record them in ``broken``."""
        keep, broken = [], []
        for i in range(len(self)):
            try:
                load_image(self.source(i))
                keep.append(i)
            except ImageError as exc:
                broken.append((self.key(i), str(exc)))
        if broken:
            kept = np.asarray(keep, dtype=np.int64)
            self.labels = [self.labels[i] for i in keep]
            self._subset(kept)
            self.broken += broken
            log.warning("%s: %d unreadable images removed (first: %s)", self.name, len(broken), broken[0][1])
        return broken

    def summary(self) -> str:
        text = f"{self.name}: {len(self)} samples"
        if self.num_dropped:
            text += f", {self.num_dropped} of {self.num_raw} labels dropped"
        if self.broken:
            text += f", {len(self.broken)} unreadable images removed"
        return text

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index`` (raises :class:`ImageError`)."""
        return load_image(self.source(index))

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        try:
            image = self.load(index)
        except ImageError as exc:
            if not self.train:
                raise
            image, index = self._substitute(index, exc)
        return (self.transform(image) if self.transform else image), self.labels[index]

    def _substitute(self, index: int, error: ImageError) -> tuple[Image.Image, int]:
        self.num_skipped += 1
        warnings.warn(f"{self.name}: skipping unreadable image {self.key(index)}: {error}", stacklevel=3)
        for step in range(1, min(_MAX_SUBSTITUTES, len(self))):
            other = (index + step) % len(self)
            try:
                return self.load(other), other
            except ImageError:
                self.num_skipped += 1
        raise ImageError(f"{self.name}: no readable image near item {index}") from error


def read_labels_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``filename<TAB>label`` lines (UTF-8, optional BOM; blank lines ignored)."""
    entries = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, tab, label = line.partition("\t")
            if not tab or not name:
                raise ValueError(f"{path}:{number}: expected 'filename<TAB>label', got {line[:80]!r}")
            entries.append((name, label))
    return entries


class FolderSet(LabelledSet):
    """Images in a folder, labels in a TSV file (see the module doc)."""

    def __init__(self, path: str | os.PathLike, charset: str = "94", max_length: int = MAX_LABEL_LENGTH,
                 train: bool = False, transform: Transform | None = None, verify: bool | None = None) -> None:
        path = Path(path)
        labels_file = path / "labels.tsv" if path.is_dir() else path
        if not labels_file.is_file():
            raise FileNotFoundError(f"{labels_file}: no labels file")
        name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
        super().__init__(name, train, charset, max_length, transform)
        entries = read_labels_tsv(labels_file)
        self.root = labels_file.parent / "images"
        if not self.root.is_dir() or (entries and not (self.root / entries[0][0]).exists()
                                      and (labels_file.parent / entries[0][0]).exists()):
            self.root = labels_file.parent
        kept = self._select([label for _, label in entries])
        self.files = [entries[i][0] for i in kept]
        if (not train) if verify is None else verify:
            self.verify()
        log.info("%s", self.summary())

    def source(self, index: int) -> ImageSource:
        return self.root / self.files[index]

    def key(self, index: int) -> str:
        return self.files[index]

    def _subset(self, keep: np.ndarray) -> None:
        self.files = [self.files[i] for i in keep]


class LmdbSet(LabelledSet):
    """One scene-text LMDB (see :mod:`.lmdb_io`; environments are shared per process)."""

    def __init__(self, path: str | os.PathLike, charset: str = "94", max_length: int = MAX_LABEL_LENGTH,
                 train: bool = False, transform: Transform | None = None, verify: bool | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(name or self.path.name, train, charset, max_length, transform)
        env = lmdb_io.open_env(self.path)
        count = lmdb_io.read_count(env)
        with env.begin() as txn:
            raw = []
            for i in range(1, count + 1):
                value = txn.get(lmdb_io.label_key(i))
                raw.append(value.decode("utf-8", errors="replace") if value is not None else "")
        self.indices = self._select(raw) + 1  # LMDB keys start at 1
        if (not train) if verify is None else verify:
            self.verify()
        log.info("%s", self.summary())

    def _txn_get(self, key: bytes) -> bytes | None:
        with lmdb_io.open_env(self.path).begin() as txn:
            return txn.get(key)

    def source(self, index: int) -> ImageSource:
        data = self._txn_get(lmdb_io.image_key(int(self.indices[index])))
        if data is None:
            raise ImageError(f"{self.path}: missing key {self.key(index)}")
        return data

    def key(self, index: int) -> str:
        return lmdb_io.image_key(int(self.indices[index])).decode()

    def _subset(self, keep: np.ndarray) -> None:
        self.indices = self.indices[keep]


class ConcatSets(ConcatDataset):
    """Several sets as one, with their counts added up."""

    def __init__(self, datasets: Sequence[Dataset], name: str | None = None) -> None:
        super().__init__(datasets)
        self.name = name or "+".join(getattr(d, "name", "?") for d in datasets)

    def _sum(self, attr: str) -> int:
        return sum(int(getattr(d, attr, 0)) for d in self.datasets)

    @property
    def num_raw(self) -> int:
        return self._sum("num_raw")

    @property
    def num_dropped(self) -> int:
        return self._sum("num_dropped")

    @property
    def broken(self) -> list[tuple[str, str]]:
        return [item for d in self.datasets for item in getattr(d, "broken", [])]

    @property
    def labels(self) -> list[str]:
        return [label for d in self.datasets for label in getattr(d, "labels", [])]

    def summary(self) -> str:
        parts = [d.summary() if hasattr(d, "summary") else getattr(d, "name", "?") for d in self.datasets]
        return f"{self.name}: {len(self)} samples ({'; '.join(parts)})"


def open_set(path: str | os.PathLike, charset: str = "94", max_length: int = MAX_LABEL_LENGTH,
             train: bool = False, transform: Transform | None = None,
             verify: bool | None = None) -> LabelledSet | ConcatSets:
    """Open a folder set, a labels ``.tsv`` file or an LMDB tree (see the module doc).

    ``verify`` defaults to ``not train``. Raises ``FileNotFoundError`` with the reason when
    ``path`` is none of these.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".tsv":
            return FolderSet(path, charset, max_length, train, transform, verify)
        if path.name == "data.mdb":
            path = path.parent
        else:
            raise FileNotFoundError(f"{path}: expected a labels .tsv file, a folder or an LMDB directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "labels.tsv").is_file():
        return FolderSet(path, charset, max_length, train, transform, verify)
    found = lmdb_io.find_lmdb_dirs(path)
    if not found:
        tsvs = sorted(p.name for p in path.glob("*.tsv"))
        hint = f"; pick one of its labels files: {', '.join(tsvs)}" if tsvs else ""
        raise FileNotFoundError(f"{path}: no labels.tsv and no LMDB (data.mdb) below it{hint}")
    sets = [LmdbSet(p, charset, max_length, train, transform, verify,
                    name=str(p.relative_to(path)) if p != path else path.name) for p in found]
    return sets[0] if len(sets) == 1 else ConcatSets(sets, name=path.name)
