"""Training and evaluation data: readers, synthetic words, augmentation, loaders.

The API the trainer, the evaluator, export checks and benchmarks use::

    from training.data import build_loader, build_dataset, open_set, collate

    loader = build_loader(["../shared/data/train/ic15_train_4468", "synth:100000"],
                          model_cfg.image, charset=model_cfg.charset_train,
                          max_length=model_cfg.max_label_length, batch_size=64,
                          train=True, workers=2, seed=0)
    for images, labels in loader:        # float32 (B,3,H,W), list[str]
        ...

* ``build_loader(specs, preprocessing, *, charset, max_length, batch_size, train,
  augment=None, shuffle=None, workers=0, distributed=False, seed=0, drop_last=None,
  verify=None) -> DataLoader`` (:mod:`.loader`).
* ``build_dataset(spec, preprocessing, charset, max_length, train, augment, seed,
  verify=None) -> Dataset`` of ``(tensor (3,H,W), label)``; ``preprocessing=None`` gives
  PIL images. ``spec``: a path (folder with ``labels.tsv``, a labels ``.tsv``, an LMDB
  tree) or ``synth:N[:SEED[:DIFFICULTY]]``.
* ``open_set(path, charset, max_length, train=False, transform=None, verify=None)``:
  the reader for a path, ``(PIL image, label)`` items (:mod:`.readers`, which documents
  the label policy and how broken images are handled).
* ``collate(batch) -> (images float32 (B,3,H,W), labels list[str])``.
* ``SynthWords(n, seed, charset, max_length, transform)`` (:mod:`.synth`).
* ``build_transform(preprocessing, augment)``, ``STRRandAugment`` (:mod:`.transforms`).

Commands: ``python -m training.data.make_lmdb SRC -o OUT`` and
``python -m training.data.synth -n N -o OUT --seed S``.
"""

from .loader import build_dataset, build_loader, collate, parse_synth_spec
from .readers import ConcatSets, FolderSet, LabelledSet, LmdbSet, open_set, select_label
from .transforms import STRRandAugment, ToModelInput, augmentation, build_transform

__all__ = [
    "ConcatSets",
    "FolderSet",
    "LabelledSet",
    "LmdbSet",
    "STRRandAugment",
    "SynthWords",
    "ToModelInput",
    "augmentation",
    "build_dataset",
    "build_loader",
    "build_transform",
    "collate",
    "open_set",
    "parse_synth_spec",
    "select_label",
]


def __getattr__(name: str):
    # imported lazily so that ``python -m training.data.synth`` does not import itself twice
    if name == "SynthWords":
        from .synth import SynthWords

        return SynthWords
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
