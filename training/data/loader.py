"""Datasets from specs, the batch collate function and the DataLoader builder.

A *spec* names one source of samples:

* a path: a folder with ``labels.tsv``, a labels ``.tsv`` file or an LMDB tree
  (:func:`.readers.open_set`);
* ``synth:N``, ``synth:N:SEED`` or ``synth:N:SEED:DIFFICULTY``: N synthetic words rendered
  on the fly (:class:`.synth.SynthWords`; SEED defaults to the ``seed`` argument,
  DIFFICULTY in [0, 1] to 1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from runtime.charset import MAX_LABEL_LENGTH
from runtime.preprocess import Preprocessing, pad_batch

from .readers import ConcatSets, open_set
from .transforms import build_transform


def parse_synth_spec(spec: str, seed: int = 0) -> tuple[int, int, float] | None:
    """``(N, seed, difficulty)`` for ``synth:N[:SEED[:DIFFICULTY]]``; ``None`` when ``spec``
    is not synthetic."""
    if not spec.startswith("synth:"):
        return None
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3, 4):
            raise ValueError
        n = int(parts[1])
        difficulty = float(parts[3]) if len(parts) == 4 else 1.0
        return n, int(parts[2]) if len(parts) >= 3 else seed, difficulty
    except ValueError:
        raise ValueError(f"bad synthetic spec {spec!r}: expected synth:N, synth:N:SEED or "
                         "synth:N:SEED:DIFFICULTY") from None


def build_dataset(
    spec: str,
    preprocessing: Preprocessing | None,
    charset: str = "94",
    max_length: int = MAX_LABEL_LENGTH,
    train: bool = True,
    augment: bool = False,
    seed: int = 0,
    verify: bool | None = None,
) -> Dataset:
    """One dataset of ``(tensor (3,H,W), label)`` (or ``(PIL image, label)`` without preprocessing).

    ``train`` picks the label policy (normalise for training, protocol filter for
    evaluation; see :mod:`.readers`); ``augment`` adds the training augmentation.
    """
    transform = build_transform(preprocessing, augment) if preprocessing is not None else None
    synthetic = parse_synth_spec(str(spec), seed)
    if synthetic is not None:
        from .synth import SynthWords  # imported here so `python -m training.data.synth` runs cleanly

        n, synth_seed, difficulty = synthetic
        return SynthWords(n, synth_seed, charset, max_length, transform, difficulty=difficulty)
    return open_set(spec, charset, max_length, train=train, transform=transform, verify=verify)


def collate(batch: Sequence[tuple[torch.Tensor | np.ndarray, str]],
            preprocessing: Preprocessing | None = None) -> tuple[torch.Tensor, list[str]]:
    """``[(image (3,H,W), label), ...]`` -> ``(images (B,3,H,W) float32, labels)``.

    Images of different widths (an aspect-keeping ``preprocessing``) are right-padded to
    the batch width by :func:`runtime.preprocess.pad_batch`."""
    images, labels = [], []
    for image, label in batch:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"collate needs image tensors, got {type(image).__name__}: "
                            "build the dataset with a Preprocessing")
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError("empty batch")
    if preprocessing is not None and preprocessing.keep_aspect:
        return torch.from_numpy(pad_batch([image.float().numpy() for image in images], preprocessing)), labels
    return torch.stack(images).float(), labels


def build_loader(
    specs: str | Sequence[str],
    preprocessing: Preprocessing,
    *,
    charset: str = "94",
    max_length: int = MAX_LABEL_LENGTH,
    batch_size: int = 64,
    train: bool = True,
    augment: bool | None = None,
    shuffle: bool | None = None,
    workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    verify: bool | None = None,
) -> DataLoader:
    """A DataLoader over the concatenation of ``specs`` yielding :func:`collate` batches.

    ``augment``, ``shuffle`` and ``drop_last`` default to ``train``. With ``distributed``
    a ``DistributedSampler`` (seeded with ``seed``) splits the data across ranks: call
    ``loader.sampler.set_epoch(epoch)`` each epoch. Shuffling and worker seeds follow
    ``seed``, so a run is reproducible. The dataset is ``loader.dataset`` (its
    ``summary()`` says what was dropped).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("no data specs given")
    augment = train if augment is None else augment
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    datasets = [build_dataset(s, preprocessing, charset, max_length, train, augment, seed + i, verify)
                for i, s in enumerate(specs)]
    dataset = datasets[0] if len(datasets) == 1 else ConcatSets(datasets)
    if len(dataset) == 0:
        raise ValueError(f"no usable samples in {', '.join(map(str, specs))}")
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate, preprocessing=preprocessing),
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )
