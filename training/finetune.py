"""Fine-tune a model's PP-OCR image tower and its CTC head on a user's own labelled crops,
without forgetting what it read before, on a CPU in minutes.

    python -m training.finetune TRAIN... --val VAL -o OUT [--minutes 10] [--from CKPT]

``--minutes`` is the whole run's wall time: training gets what reading the sets before it and
choosing, exporting and checking after it are expected to leave (``--train-minutes`` fixes the
training time instead).

TRAIN and VAL are labelled sets in the ``../shared/data`` layout (a folder with ``images/``
and ``labels.tsv``, or a ``.tsv`` file; only the listed files count). The model starts from
the embedded default's checkpoint (or ``--from``). The default reads what its tower's CTC head
reads, so the tower and that head are what learn: CTC loss on the user's crops (optionally
case-folded, optionally augmented), learning rates per part on a cosine to 0 over the time
budget, distillation terms (the original's per-frame distribution on synthetic words, and
optionally on the user's crops). The tower's batch norms stay in inference mode
(:meth:`PPOCRFeatures.train`).

Forgetting is handled after training, in weight space: the trained tower is mixed with the
original (``original + alpha * (trained - original)``, alpha on a grid from 0 to 1) and the mix
kept is the one that reads VAL best (the tower's CTC reading, the runtime's protocol) while
no keep set (``--keep`` sets of general crops, and held-out synthetic words, worn) loses more than
``--keep-tolerance`` percent of its crops: words the original read right and the mix reads wrong
(gains elsewhere do not make up for them). Such mixes often read the new domain better
than either end (weight-space ensembling of fine-tuned models, WiSE-FT: Wortsman et al., CVPR
2022). The trained tower may also ship beside the general one as a *specialist*
(:mod:`runtime.specialist`): read only on the crops the general tower doubts, its reading kept
where it is surer; it is chosen, with its threshold, by the same rule on the same sets
(:mod:`training.specialist_fit`), and only when it reads VAL better than the mix alone. Then
the exported bundle's decode mode is chosen on VAL and the keep sets, and whether it reads
doubtful crops again under the starting bundle's views (:mod:`training.bundle_settings`).

OUT gets ``checkpoint/`` (``model.json`` + ``model.safetensors``, with the fine-tune's
settings and figures in its meta) and ``bundle/`` (exported as the default's is; ``clipllama-run
--engine OUT/bundle`` reads with it), and ``trained_tower.safetensors`` (the tower at the end
of the schedule, before the mix). The last line on stdout is one JSON object: validation
accuracy before and after (with the runtime's recognizer on the bundles, each with its decode mode
and views).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from runtime.charset import WordAccuracy, normalize_label
from runtime.decoding import CharCodec
from runtime.inputs import InputError, open_labelled
from runtime.preprocess import ImageError, load_image, preprocess
from training.bundle_settings import KEEP_SAMPLE, settle_bundle
from training.checkpoint import load_checkpoint, save_checkpoint
from training.specialist_fit import keeps


@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tune does; the defaults were chosen on validation data (docs/finetune.md)."""

    #: the whole run's wall time: training gets what reading the sets before it and choosing,
    #: exporting and checking after it are expected to leave (:func:`training_budget`)
    minutes: float = 10.0
    #: training time instead (None: from ``minutes``); the run then takes longer than this
    train_minutes: float | None = None
    batch: int = 16
    #: learning rates (AdamW) of the tower's convolutional backbone, of its SVTR neck and of
    #: the CTC head; 0 freezes that part
    lr_backbone: float = 3e-5
    lr_neck: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.0
    #: weight of the distillation term on synthetic words (the original's distribution): it
    #: halves the steps a time budget allows, but the trained tower forgets less, so the mix
    #: can go further (validation of two domains, 0.5 against 0: LED 65.0 / 58.5, low
    #: resolution 84.0 / 85.0; docs/finetune.md)
    distill: float = 0.5
    #: weight of the distillation term on the user's own crops
    distill_own: float = 0.1
    #: synthetic words drawn for the distillation term
    general: int = 1500
    #: synthetic words held out to measure what the general reading keeps (a keep set beside
    #: the user's ``--keep`` sets; 0: none, then ``--keep`` is needed), each worn as a cheap camera
    #: gives it (:func:`training.data.transforms.worn_copy`): on two domains' mixes, 1,000 worn
    #: words lost about half the share of real general crops that the mixes broke, 400 clean ones
    #: a fifth (docs/finetune.md, "A keep set of worn synthetic words")
    keep_synthetic: int = 1000
    #: percent of each keep set that may be lost: words the original read right and the fine-tuned
    #: reader reads wrong (words gained elsewhere do not make up for them). The trained weights
    #: are mixed with the original's (``original + alpha * (trained - original)``), and the mix
    #: (and specialist) that reads the validation sets best within this on every keep set is kept
    keep_tolerance: float = 0.5
    #: the learning rates follow a cosine from their value to 0 over the time budget
    cosine: bool = True
    #: photometric and small geometric changes of the user's crops at every draw (sizes kept)
    augment: bool = True
    #: the mixes tried (alpha; 0 is the original, 1 the trained state)
    mixes: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    #: bisections between the chosen mix and the next on the grid when that one loses too much
    refine: int = 2
    #: compare case-insensitively in the CTC loss (upper and lower case probabilities summed:
    #: for labels whose case is not reliable)
    ignore_case: bool = False
    #: seconds between validations
    eval_every_s: float = 60.0
    seed: int = 0
    threads: int = 0
    #: fit the bundle's views anew on VAL and the keep sets (``export.views``), instead of keeping
    #: the source bundle's when no set reads worse with them (:mod:`training.bundle_settings`)
    fit_views: bool = False
    #: whether the trained tower may ship as the bundle's specialist, reading the crops the
    #: general tower doubts (:mod:`runtime.specialist`), when VAL and the keep sets say so
    specialist: bool = True


#: the work after training, in units of one CTC reading of every VAL and keep crop by the tower
#: (timed on VAL before training): MIX_READ_SHARE of a reading per mix scored (most mixes stop
#: early, :func:`score_mixes`), and AFTER_RUNTIME_READS for the runtime's readings (decode modes,
#: views, before and after), plus AFTER_FIXED_S seconds of export and checks; fitted on runs here
#: (docs/finetune.md, "`--minutes` is the whole run" and "Less reading after training")
MIX_READ_SHARE = 0.5
AFTER_RUNTIME_READS = 4.5
AFTER_FIXED_S = 10.0
#: training keeps at least this share of ``minutes``, whatever the estimate says (the run then
#: takes longer than asked, and says so)
MIN_TRAIN_SHARE = 0.2


#: the name of the held-out synthetic keep set (it checks what the tower forgets; the runtime
#: settings' views, fitted on real crops, are judged without it: :func:`settle_bundle`)
SYNTHETIC_KEEP = "synthetic"

#: a keep set that allows fewer broken words than this gets a note: its verdicts turn on single
#: words the original itself was unsure of (docs/finetune.md, "Less reading after training")
FEW_BROKEN_ALLOWED = 5


def warn_small_keep_sets(sizes: dict[str, int], tolerance: float) -> list[str]:
    """Say (stderr) which keep sets allow fewer than :data:`FEW_BROKEN_ALLOWED` broken words; their names."""
    from training.specialist_fit import most_broken

    small = [name for name, n in sizes.items() if most_broken(n, tolerance) < FEW_BROKEN_ALLOWED]
    if small:
        listed = ", ".join(f"{name} ({sizes[name]} crops: {most_broken(sizes[name], tolerance)})" for name in small)
        print(f"note: keep sets this small allow few broken words, so one unsure word can decide: {listed}; "
              "a few thousand general crops in --keep make the check meaningful", file=sys.stderr)
    return small


def training_budget(settings: FinetuneSettings, setup_s: float, per_crop_s: float, crops_after: int,
                    runtime_crops: int | None = None) -> float:
    """Seconds of training: ``train_minutes`` when given, else what ``minutes`` leaves after the
    setup (``setup_s``, done) and the estimated work after training (``crops_after`` VAL and keep
    crops read ``per_crop_s`` each per mix, and ``runtime_crops`` of them, default all, by the
    runtime), at least ``MIN_TRAIN_SHARE``."""
    if settings.train_minutes is not None:
        return settings.train_minutes * 60.0
    total = settings.minutes * 60.0
    mixes = len({0.0, *settings.mixes}) + settings.refine
    runtime_crops = crops_after if runtime_crops is None else runtime_crops
    after = per_crop_s * (crops_after * MIX_READ_SHARE * mixes + runtime_crops * AFTER_RUNTIME_READS) + AFTER_FIXED_S
    budget = max(MIN_TRAIN_SHARE * total, total - setup_s - after)
    print(f"fine-tune: {budget / 60:.1f} minutes of training (reading the sets took {setup_s / 60:.1f}, choosing "
          f"and exporting after it about {after / 60:.1f})" + ("; the run will likely take longer than --minutes"
                                                             if budget + setup_s + after > total + 1 else ""),
          file=sys.stderr)
    return budget


class Batches:
    """Preprocessed crops grouped by padded width, drawn as batches of one width."""

    def __init__(self, tensors: list[np.ndarray], extras: list[Any], batch: int, rng: random.Random) -> None:
        self.groups: dict[int, list[int]] = {}
        for i, x in enumerate(tensors):
            self.groups.setdefault(x.shape[-1], []).append(i)
        self.tensors, self.extras, self.batch, self.rng = tensors, extras, batch, rng
        self.weights = [len(v) for v in self.groups.values()]

    def __len__(self) -> int:
        return len(self.tensors)

    def draw(self) -> tuple[Tensor, list[Any]]:
        width = self.rng.choices(list(self.groups), weights=self.weights)[0]
        members = self.groups[width]
        chosen = self.rng.sample(members, min(self.batch, len(members)))
        images = torch.from_numpy(np.concatenate([self.tensors[i] for i in chosen]))
        return images, [self.extras[i] for i in chosen]


def read_sets(paths: Sequence[str | Path], charset: str, max_length: int) -> list[tuple[Any, str]]:
    """(image, label) of every listed, readable crop with a usable label."""
    out = []
    for path in paths:
        try:
            opened = open_labelled(path)
        except InputError as exc:
            raise SystemExit(f"error: {exc}") from None
        for sample in opened.samples:
            label = normalize_label(str(sample.label), charset, max_length)
            if not label:
                continue
            try:
                out.append((load_image(sample.data), label))
            except ImageError as exc:
                print(f"note: skipped {exc}", file=sys.stderr)
    return out


class Tower(nn.Module):
    """The part that learns: the PP-OCR features and the CTC classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.image_encoder.features
        self.classifier = model.image_encoder.ctc.classifier

    def forward(self, images: Tensor) -> Tensor:
        # channels-last: onednn's depthwise and pooling kernels run about 1.5x faster on a CPU
        images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.features(images)).log_softmax(-1)


def case_folding(charset: str) -> tuple[Tensor, list[int]]:
    """A (C+1, K) 0/1 matrix that sums each letter's upper and lower case (blank and other
    characters kept), and the folded class of each original class."""
    keys: dict[str, int] = {"": 0}
    fold = [0]
    for char in charset:
        key = char.lower()
        fold.append(keys.setdefault(key, len(keys)))
    matrix = torch.zeros(len(fold), len(keys))
    matrix[torch.arange(len(fold)), torch.tensor(fold)] = 1.0
    return matrix, fold


def ctc_loss(log_probs: Tensor, labels: list[str], codec: CharCodec, fold: tuple[Tensor, list[int]] | None) -> Tensor:
    """Mean CTC loss of ``(B, T, C+1)`` log-probabilities against ``labels`` (optionally with
    upper and lower case summed)."""
    targets = [torch.from_numpy(codec.ids(label)) for label in labels]
    if fold is not None:
        matrix, classes = fold
        log_probs = torch.log(log_probs.exp() @ matrix + 1e-12)
        targets = [torch.tensor([classes[int(i)] for i in t], dtype=torch.long) for t in targets]
    lengths = torch.tensor([len(t) for t in targets])
    frames = torch.full((len(labels),), log_probs.shape[1], dtype=torch.long)
    return nn.functional.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), frames, lengths,
                                  blank=0, reduction="mean", zero_infinity=True)


def distillation(log_probs: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) per frame, averaged."""
    return (teacher.exp() * (teacher - log_probs)).sum(-1).mean()


def ctc_readings(tower: Tower, crops: list[np.ndarray], codec: CharCodec) -> list[tuple[str, float]]:
    """(text, confidence) of the tower's greedy CTC reading of each crop, as the runtime reads."""
    readings = ctc_readings_until(tower, crops, codec, None)
    assert readings is not None
    return readings


def ctc_readings_until(tower: Tower, crops: list[np.ndarray], codec: CharCodec,
                       stop: Callable[[list[int], list[Any]], bool] | None) -> list[tuple[str, float]] | None:
    """:func:`ctc_readings`, asking ``stop(indices, readings)`` after each batch (the crops just
    read, and the readings so far, None where not read yet); when it says so, the reading ends
    there and None is returned."""
    from runtime.ctc_reading import ctc_prediction

    tower.eval()
    out: list[Any] = [None] * len(crops)
    for chunk, rows in batched_answers(tower, crops, 32):
        for i, row in zip(chunk, rows):
            prediction = ctc_prediction(codec, row.numpy())
            out[i] = (prediction.text, prediction.confidence)
        if stop is not None and stop(chunk, out):
            return None
    return out


def ctc_accuracy(tower: Tower, crops: list[np.ndarray], labels: list[str], codec: CharCodec) -> float:
    """Word accuracy (%, protocol) of the tower's greedy CTC reading."""
    accuracy = WordAccuracy()
    accuracy.update([text for text, _ in ctc_readings(tower, crops, codec)], labels)
    return float(accuracy.as_dict()["accuracy"])


@torch.no_grad()
def batched_answers(model: Tower, crops: list[np.ndarray], batch: int) -> Iterator[tuple[list[int], Tensor]]:
    """``model``'s per-frame log-probabilities, batch by batch (crops of one width together):
    the crops' indices and their rows."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(crops):
        groups.setdefault(x.shape[-1], []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            yield chunk, model(torch.from_numpy(np.concatenate([crops[i] for i in chunk])))


def answers(model: Tower, crops: list[np.ndarray], batch: int) -> list[Tensor]:
    """``model``'s per-frame log-probabilities of each crop, run in batches of one width."""
    out: list[Tensor | None] = [None] * len(crops)
    for chunk, rows in batched_answers(model, crops, batch):
        for i, row in zip(chunk, rows):
            out[i] = row
    return out  # type: ignore[return-value]


#: the tower's state at the end of the schedule, before mixing (OUT/...), kept so that other
#: mixes can be tried without training again
TRAINED_FILE = "trained_tower.safetensors"


def save_tower_state(state: dict[str, Tensor], path: Path) -> None:
    """Write a :class:`Tower` state as safetensors (contiguous copies)."""
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in state.items()}, str(path))


def load_tower_state(path: Path) -> dict[str, Tensor]:
    """A state written by :func:`save_tower_state`."""
    from safetensors.torch import load_file

    return load_file(str(path))


def mixed_state(original: dict[str, Tensor], trained: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``original + alpha * (trained - original)`` for every floating-point tensor (the
    others, e.g. counters, from ``trained``): a weight-space mix of two states of one model."""
    return {name: original[name] + alpha * (value - original[name]) if value.is_floating_point() else value
            for name, value in trained.items()}


def pick_mix(rows: Sequence[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The row (``alpha``, ``val_ctc``, ``keep_ctc``: accuracy per keep set) that reads the
    validation sets best while losing at most ``tolerance`` points of the original's (alpha 0)
    accuracy on every keep set; ties: the higher mean keep accuracy, then the smaller mix. The
    original always qualifies."""
    original = next(row for row in rows if row["alpha"] == 0.0)

    def kept(row: dict[str, Any]) -> bool:
        return keeps(row, original, tolerance)

    def mean_keep(row: dict[str, Any]) -> float:
        return sum(row["keep_ctc"].values()) / max(1, len(row["keep_ctc"]))

    return max((row for row in rows if kept(row)), key=lambda row: (row["val_ctc"], mean_keep(row), -row["alpha"]))


def nothing_kept_note(rows: Sequence[dict[str, Any]], tolerance: float) -> str | None:
    """When the original was kept because every mix below 1 broke a keep set (mix 1 is read whole
    for the specialist): a note naming the words that broke the smallest (and the original's
    confidence in them) and what the trained tower reads on VAL; else None."""
    mixed = sorted((row for row in rows if row["alpha"] > 0), key=lambda row: row["alpha"])
    if not mixed or any("stopped" not in row for row in mixed if row["alpha"] < 1.0):
        return None  # some mix kept every set: it was VAL that chose the original
    first, original = mixed[0], min(rows, key=lambda row: row["alpha"])
    name, words = first["stopped"], first.get("broken_words", [])
    listed = ", ".join(f"{label} ({confidence:.2f})" for label, confidence in words)
    trained = next((row for row in rows if row["alpha"] == 1.0 and "val_ctc" in row), None)
    gain = (f"; the trained tower reads VAL at {trained['val_ctc']:.1f} against {original['val_ctc']:.1f}"
            if trained else "")
    return (f"note: nothing learnt was kept: the smallest mix tried (alpha {first['alpha']:g}) breaks {len(words)} "
            f"words of {name} that the original read right, {first.get('allowed', 0)} allowed at "
            f"--keep-tolerance {tolerance:g}: {listed} (the original's confidence){gain}. Words the original "
            "itself doubted can decide this: a keep set of a few thousand general crops tells forgetting from such "
            "noise, and a higher --keep-tolerance trades general words for the domain's")


def refine_mix(rows: list[dict[str, Any]], score: Any, tolerance: float, steps: int) -> list[dict[str, Any]]:
    """``rows`` plus ``steps`` bisections between the chosen mix and the next one on the grid
    when that one loses too much (the best mix is often at that edge): ``score(alpha)`` gives
    a new row."""
    rows = sorted(rows, key=lambda row: row["alpha"])
    original = rows[0]
    chosen = pick_mix(rows, tolerance)
    above = [row for row in rows if row["alpha"] > chosen["alpha"]]
    if not above or keeps(above[0], original, tolerance):
        return rows
    low, high = chosen["alpha"], above[0]["alpha"]
    for _ in range(steps):
        row = score(round((low + high) / 2, 4))
        rows.append(row)
        low, high = (row["alpha"], high) if keeps(row, original, tolerance) else (low, row["alpha"])
    return sorted(rows, key=lambda row: row["alpha"])


def score_mixes(tower: Tower, original: dict[str, Tensor], trained: dict[str, Tensor],
                val: tuple[list[np.ndarray], list[str]], keep: dict[str, tuple[list[np.ndarray], list[str]]],
                codec: CharCodec, mixes: Sequence[float], tolerance: float = 0.5,
                refine: int = 2, readings: dict[float, dict[str, list[tuple[str, float]]]] | None = None,
                whole: Sequence[float] = (),
                ) -> list[dict[str, Any]]:
    """The validation accuracy and the accuracy on each keep set (CTC reading) of each mix of
    ``original`` and ``trained`` (mix 0, the original, always among them), with ``refine``
    bisections at the edge of the tolerance (:func:`refine_mix`). The keep sets are read first,
    and a mix's reading stops as soon as one of them has lost more words than the tolerance
    allows (most mixes fail so, and neither the rest of that set nor VAL changes the verdict):
    such a row has ``stopped`` (the set's name) and that set's ``keep_broken`` so far, no
    accuracies, the words it ``allowed`` and ``broken_words``: each broken word's label and the
    original's confidence in it.
    Mix 0 and the mixes in ``whole`` are always read whole. ``readings``, when given,
    gets each whole mix's CTC readings per set (``specialist_fit.VAL`` and the keep sets' names),
    for :func:`fit_specialist`."""
    from runtime.charset import word_correct
    from training.specialist_fit import VAL, most_broken, right_before
    from training.specialist_fit import score as scored

    sets = {**keep, VAL: val}  # VAL last: a mix that breaks a keep set is not read on it
    labels = {name: truths for name, (_, truths) in sets.items()}
    before: dict[str, list[bool]] = {}  # which keep crops the original (mix 0, scored first) reads right
    sureness: dict[str, list[float]] = {}  # and how sure it is of each

    def score(alpha: float) -> dict[str, Any]:
        tower.load_state_dict(mixed_state(original, trained, alpha))
        read: dict[str, list[tuple[str, float]]] = {}
        for name, (crops, truths) in sets.items():
            if not before or name == VAL or alpha in whole:
                read[name] = ctc_readings(tower, crops, codec)
                continue
            allowed, broken = most_broken(len(truths), tolerance), []

            def too_many(chunk: list[int], so_far: list[Any], name: str = name, truths: list[str] = truths,
                         allowed: int = allowed, broken: list[int] = broken) -> bool:
                broken.extend(i for i in chunk if before[name][i] and not word_correct(so_far[i][0], truths[i]))
                return len(broken) > allowed

            done = ctc_readings_until(tower, crops, codec, too_many)
            if done is None:
                return {"alpha": alpha, "stopped": name, "keep_broken": {name: 100.0 * len(broken) / len(truths)},
                        "allowed": allowed, "broken_words": [[truths[i], round(sureness[name][i], 2)] for i in broken]}
            read[name] = done
        if readings is not None:
            readings[alpha] = read
        if not before:
            before.update(right_before(read, labels))
            sureness.update({name: [confidence for _, confidence in texts] for name, texts in read.items()})
        row = scored(read, read, labels, None, before)  # the mix alone: no specialist
        return {"alpha": alpha, "val_ctc": row["val_ctc"], "keep_ctc": row["keep_ctc"],
                "keep_broken": row["keep_broken"]}

    rows = [score(alpha) for alpha in sorted({0.0, *mixes})]
    return refine_mix(rows, score, tolerance, refine)


def fit_specialist(tower: Tower, trained: dict[str, Tensor], alpha: float,
                   readings: dict[float, dict[str, list[tuple[str, float]]]],
                   val: tuple[list[np.ndarray], list[str]], keep: dict[str, tuple[list[np.ndarray], list[str]]],
                   codec: CharCodec, tolerance: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Whether the trained tower, consulted on the crops the general one doubts (the original,
    or the mix ``alpha``), reads better than the mix alone (:mod:`training.specialist_fit`):
    the chosen row (``below`` None: no specialist) and every row. ``readings``: each mix's CTC
    readings from :func:`score_mixes` (the trained tower's is read here when mix 1 was not scored)."""
    from training.specialist_fit import VAL, choose_specialist

    sets = {VAL: val, **keep}
    if 1.0 not in readings:
        tower.load_state_dict(trained)
        readings[1.0] = {name: ctc_readings(tower, crops, codec) for name, (crops, _) in sets.items()}
    generals = {a: readings[a] for a in sorted({0.0, alpha})}
    return choose_specialist(generals, readings[1.0], {name: labels for name, (_, labels) in sets.items()}, tolerance)


def augment(image: Any, rng: random.Random) -> Any:
    """A changed copy of a crop of the same size: contrast, brightness, a shift of a few
    pixels and a small rotation, each at random (the words stay readable)."""
    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    width, height = image.size
    if rng.random() < 0.5:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        dx, dy = round(rng.uniform(-0.04, 0.04) * width), round(rng.uniform(-0.08, 0.08) * height)
        image = image.transform(image.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy),
                                resample=Image.Resampling.BILINEAR, fillcolor=image.getpixel((0, 0)))
    if rng.random() < 0.3:
        image = image.rotate(rng.uniform(-3.0, 3.0), resample=Image.Resampling.BILINEAR,
                             fillcolor=image.getpixel((0, 0)))
    return image


def preprocessed_crops(images: list[Any], spec: Any) -> list[np.ndarray]:
    """Each crop as the runtime preprocesses it alone: ``(1, 3, H, W)`` at its own padded width."""
    return [preprocess([image], spec) for image in images]


def start_model(source: Path | None, threads: int, seed: int, command: str) -> tuple[Any, Path, random.Random]:
    """Threads and seeds set, the model of ``source`` (default: the embedded default's
    checkpoint), checked to have a PP-OCR tower with a CTC head; the model, its source, an rng."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if source is None:
        from runtime.bundle import DEFAULT_BUNDLE

        source = DEFAULT_BUNDLE
    model = load_checkpoint(source)
    if getattr(model.image_encoder, "ctc", None) is None:
        raise SystemExit(f"error: {source}: {command} needs a model with a PP-OCR tower and CTC head")
    return model, source, random.Random(seed)


def finetune(train: list[tuple[Any, str]], val: list[tuple[Any, str]], out: Path, settings: FinetuneSettings,
             source: Path | None = None, progress: bool = True,
             keep: dict[str, list[tuple[Any, str]]] | None = None) -> dict[str, Any]:
    """Fine-tune (see the module doc); the summary that the command prints."""
    from training.data.synth import SynthWords

    started = time.monotonic()
    model, source, rng = start_model(source, settings.threads, settings.seed, "training.finetune")
    cfg = model.cfg
    spec = cfg.image
    codec = CharCodec(cfg.charset_train)
    tower = Tower(model).to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(tower).eval().requires_grad_(False)
    tower.classifier.requires_grad_(True)
    fold = case_folding(codec.charset) if settings.ignore_case else None

    own_x = preprocessed_crops([x for x, _ in train], spec)
    val_x = preprocessed_crops([x for x, _ in val], spec)
    val_y = [y for _, y in val]
    # the original's answers to the user's crops as they are (unused when every draw changes them)
    own_distilled = settings.distill_own and not settings.augment
    own_teacher = answers(teacher, own_x, settings.batch) if own_distilled else [None] * len(own_x)
    anchor = None
    if settings.distill:  # synthetic words and the original's answers to them, drawn once
        general = SynthWords(settings.general, settings.seed + 1, cfg.charset_train)
        general_x = preprocessed_crops([general[i][0] for i in range(len(general))], spec)
        anchor = Batches(general_x, answers(teacher, general_x, settings.batch), settings.batch, rng)
    keep = dict(keep or {})
    if settings.keep_synthetic:  # the general reading, on synthetic words no step trains on
        from training.data.transforms import worn_copy

        held_out = SynthWords(settings.keep_synthetic, settings.seed + 2, cfg.charset_train)
        wear = random.Random(settings.seed + 3)
        samples = (held_out.sample(i) for i in range(len(held_out)))
        keep[SYNTHETIC_KEEP] = [(worn_copy(image, wear), label) for image, label in samples]
    if not keep:
        raise SystemExit("error: no keep set: give --keep SET or --keep-synthetic N")
    keep_sets = {name: (preprocessed_crops([x for x, _ in pairs], spec), [y for _, y in pairs])
                 for name, pairs in keep.items()}
    warn_small_keep_sets({name: len(pairs) for name, pairs in keep.items()}, settings.keep_tolerance)
    own = Batches(own_x, [(y, t, i) for i, ((_, y), t) in enumerate(zip(train, own_teacher))], settings.batch, rng)
    parts = ((tower.features.backbone, settings.lr_backbone), (tower.features.neck, settings.lr_neck),
             (tower.classifier, settings.lr_head))
    for part, lr in parts:
        part.requires_grad_(lr > 0)
    optimizer = torch.optim.AdamW([{"params": list(part.parameters()), "lr": lr} for part, lr in parts if lr > 0],
                                  weight_decay=settings.weight_decay)
    base_rates = [group["lr"] for group in optimizer.param_groups]

    reading = time.monotonic()
    before = ctc_accuracy(tower, val_x, val_y, codec)
    per_crop = (time.monotonic() - reading) / max(1, len(val_x))
    history = [{"step": 0, "seconds": 0.0, "val_ctc": before}]
    crops_after = len(val_x) + sum(len(crops) for crops, _ in keep_sets.values())
    runtime_crops = len(val_x) + sum(min(len(crops), KEEP_SAMPLE) for crops, _ in keep_sets.values())
    budget = training_budget(settings, time.monotonic() - started, per_crop, crops_after, runtime_crops)
    seconds = {"setup": time.monotonic() - started}
    train_start = time.monotonic()
    next_eval = train_start + settings.eval_every_s
    bar = progress_bar(budget, progress)
    step = seen = 0
    while time.monotonic() - train_start < budget:
        tower.train()
        if settings.cosine:
            scale = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (time.monotonic() - train_start) / budget)))
            for group, rate in zip(optimizer.param_groups, base_rates):
                group["lr"] = rate * scale
        images, extras = own.draw()
        if settings.augment:
            images = torch.from_numpy(np.concatenate([preprocess([augment(train[i][0], rng)], spec)
                                                      for _, _, i in extras]))
        log_probs = tower(images)
        loss = ctc_loss(log_probs, [y for y, _, _ in extras], codec, fold)
        if own_distilled:  # the cached answers are the unchanged crops'
            loss = loss + settings.distill_own * distillation(log_probs, torch.stack([t for _, t, _ in extras]))
        if settings.distill:
            assert anchor is not None
            general_images, targets = anchor.draw()
            loss = loss + settings.distill * distillation(tower(general_images), torch.stack(targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in tower.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        step += 1
        seen += len(images)
        now = time.monotonic()
        if bar is not None:
            bar.n = min(budget, now - train_start)
            bar.set_postfix(step=step, loss=f"{float(loss):.3f}", val=f"{history[-1]['val_ctc']:.1f}")
            bar.refresh()
        if now >= next_eval or now - train_start >= budget:
            accuracy = ctc_accuracy(tower, val_x, val_y, codec)
            history.append({"step": step, "seconds": round(now - train_start, 1), "val_ctc": accuracy})
            next_eval = time.monotonic() + settings.eval_every_s
    if bar is not None:
        bar.close()
    train_seconds = seconds["train"] = time.monotonic() - train_start
    choosing = time.monotonic()
    trained = copy.deepcopy(tower.state_dict())  # the end of the schedule: mixed with the original
    out.mkdir(parents=True, exist_ok=True)
    save_tower_state(trained, out / TRAINED_FILE)
    readings: dict[float, dict[str, list[tuple[str, float]]]] = {}  # per mix, for the specialist's fit
    mixes = score_mixes(tower, teacher.state_dict(), trained, (val_x, val_y), keep_sets, codec,
                        settings.mixes, settings.keep_tolerance, settings.refine, readings,
                        whole=(1.0,) if settings.specialist else ())  # the specialist's fit reads mix 1 whole
    chosen = pick_mix(mixes, settings.keep_tolerance)
    specialist, specialist_rows = None, None
    if settings.specialist:
        specialist, specialist_rows = fit_specialist(tower, trained, chosen["alpha"], readings, (val_x, val_y),
                                                     keep_sets, codec, settings.keep_tolerance)
        if specialist["below"] is None:  # the mix alone reads best: as before
            specialist = None
        else:
            chosen = {"alpha": specialist["alpha"], "val_ctc": specialist["val_ctc"],
                      "keep_ctc": specialist["keep_ctc"], "keep_broken": specialist["keep_broken"]}
    seconds["mixes"] = time.monotonic() - choosing
    note = nothing_kept_note(mixes, settings.keep_tolerance) if chosen["alpha"] == 0.0 and specialist is None else None
    if note:
        print(note, file=sys.stderr)
    exporting = time.monotonic()
    tower.load_state_dict(mixed_state(teacher.state_dict(), trained, chosen["alpha"]))
    tower.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    meta = {"finetune": {"settings": asdict(settings), "from": str(source), "train_crops": len(train),
                         "val_crops": len(val), "steps": step, "crops_seen": seen,
                         "history": history, "train_seconds": round(train_seconds, 1),
                         "keep_crops": {name: len(pairs) for name, pairs in keep.items()}, "mix": chosen["alpha"],
                         "mixes": mixes, "specialist": specialist}}
    checkpoint = save_checkpoint(model, out / "checkpoint", meta=meta)
    from export.onnx import export_bundle

    bundle = export_bundle(checkpoint, out / "bundle", ("fp32",), include_checkpoint=True)
    if specialist is not None:  # the trained tower reads the crops the general one doubts
        from export.specialist import add_specialist
        from runtime.specialist import SpecialistSettings

        tower.load_state_dict(trained)
        add_specialist(bundle, model, SpecialistSettings(specialist["below"]),
                       {"val_ctc": specialist["val_ctc"], "keep_ctc": specialist["keep_ctc"],
                        "keep_broken": specialist["keep_broken"], "asked_pct": specialist["asked_pct"],
                        "chosen_by": "python -m training.finetune"})
    seconds["export"] = time.monotonic() - exporting
    fitting = time.monotonic()
    settled = settle_bundle(bundle, source, val, keep, fit=settings.fit_views, tower_only=(SYNTHETIC_KEEP,))
    seconds["bundle_settings"] = time.monotonic() - fitting
    summary = {"val_before": round(settled["val_before"], 2), "val_after": round(settled["val_after"], 2),
               "decode": settled["decode"], "views": settled["views"],
               "val_ctc_before": round(before, 2), "val_ctc_after": round(chosen["val_ctc"], 2),
               "keep_ctc_before": {k: round(v, 2) for k, v in mixes[0]["keep_ctc"].items()},
               "keep_ctc_after": {k: round(v, 2) for k, v in chosen["keep_ctc"].items()},
               "keep_broken": {k: round(v, 2) for k, v in chosen["keep_broken"].items()},
               "mix": chosen["alpha"],
               "specialist": ({"below_confidence": specialist["below"], "asked_pct": specialist["asked_pct"]}
                              if specialist else None),
               "steps": step, "crops_seen": seen,
               "train_minutes": round(train_seconds / 60.0, 2),
               "total_minutes": round((time.monotonic() - started) / 60.0, 2),
               "phase_minutes": {name: round(value / 60.0, 2) for name, value in seconds.items()},
               "checkpoint": str(checkpoint), "bundle": str(bundle)}
    (out / "finetune.json").write_text(json.dumps({**summary, "history": history, "mixes": mixes,
                                                   "specialist_rows": specialist_rows,
                                                   "decode_modes": settled["decode_scores"],
                                                   "views_check": settled["views_check"]}, indent=2) + "\n")
    return summary


def progress_bar(total: float, enabled: bool) -> Any:
    """A tqdm bar over ``total`` seconds on stderr (None when disabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=math.ceil(total), unit="s", file=sys.stderr, dynamic_ncols=True, desc="fine-tune",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", nargs="+", metavar="TRAIN", help="labelled sets to learn from")
    parser.add_argument("--val", nargs="+", required=True, metavar="VAL", help="labelled sets to choose the state on")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    parser.add_argument("--from", dest="source", type=Path, metavar="CKPT",
                        help="checkpoint or bundle with model.json (default: the embedded default model)")
    defaults = FinetuneSettings()
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="the whole run's wall time; training gets what reading the sets and choosing and "
                             "exporting leave (default: %(default)s)")
    parser.add_argument("--train-minutes", type=float, metavar="M",
                        help="train for M minutes instead (the run then takes longer)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr-backbone", type=float, default=defaults.lr_backbone, help="0 freezes the backbone")
    parser.add_argument("--lr-neck", type=float, default=defaults.lr_neck, help="0 freezes the SVTR neck")
    parser.add_argument("--lr-head", type=float, default=defaults.lr_head)
    parser.add_argument("--distill", type=float, default=defaults.distill,
                        help="weight of keeping the original's reading of synthetic words (default: %(default)s)")
    parser.add_argument("--distill-own", type=float, default=defaults.distill_own)
    parser.add_argument("--general", type=int, default=defaults.general, help="synthetic words for that term")
    parser.add_argument("--keep", nargs="+", metavar="SET",
                        help="general labelled crops whose reading must be kept, each set within --keep-tolerance "
                             "(beside held-out synthetic words)")
    parser.add_argument("--keep-tolerance", type=float, default=defaults.keep_tolerance, metavar="PCT",
                        help="percent of each keep set that may be lost: words the original read right and "
                             "the result reads wrong (default: %(default)s)")
    parser.add_argument("--keep-synthetic", type=int, default=defaults.keep_synthetic, metavar="N",
                        help="held-out synthetic words, worn as a cheap camera gives them, kept as well "
                             "(default: %(default)s; 0: only --keep)")
    parser.add_argument("--no-cosine", action="store_true", help="constant learning rates")
    parser.add_argument("--no-augment", action="store_true", help="use the crops as they are")
    parser.add_argument("--no-specialist", action="store_true",
                        help="never ship the trained tower as a specialist for doubtful crops (the weight mix only)")
    parser.add_argument("--fit-views", action="store_true",
                        help="fit which doubtful crops are read again under extra views on VAL and the keep sets "
                             "(slower; by default the starting bundle's views are kept when no set reads worse)")
    parser.add_argument("--ignore-case", action="store_true", help="labels whose case is not reliable")
    parser.add_argument("--eval-every", type=float, default=defaults.eval_every_s, metavar="S")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    train_minutes_bad = args.train_minutes is not None and args.train_minutes <= 0
    if args.minutes <= 0 or train_minutes_bad or args.batch < 1 or args.general < 1 or args.keep_synthetic < 0 \
            or args.keep_tolerance < 0:
        print("error: --minutes and --train-minutes must be above 0, --batch and --general at least 1, "
              "--keep-synthetic and --keep-tolerance at least 0", file=sys.stderr)
        return 2
    if not args.keep and not args.keep_synthetic:
        print("error: --keep-synthetic 0 needs a --keep SET", file=sys.stderr)
        return 2
    settings = FinetuneSettings(minutes=args.minutes, train_minutes=args.train_minutes, batch=args.batch,
                                lr_backbone=args.lr_backbone,
                                lr_neck=args.lr_neck, lr_head=args.lr_head,
                                distill=args.distill, distill_own=args.distill_own, general=args.general,
                                ignore_case=args.ignore_case, eval_every_s=args.eval_every, seed=args.seed,
                                threads=args.threads, keep_tolerance=args.keep_tolerance,
                                keep_synthetic=args.keep_synthetic, cosine=not args.no_cosine,
                                augment=not args.no_augment, specialist=not args.no_specialist,
                                fit_views=args.fit_views)
    from runtime.charset import resolve_charset

    source = args.source
    charset = resolve_charset("94")
    train = read_sets(args.train, charset, 25)
    val = read_sets(args.val, charset, 25)
    if not train or not val:
        print("error: no usable labelled crop in " + ("TRAIN" if not train else "--val"), file=sys.stderr)
        return 2
    keep = {str(path): read_sets([path], charset, 25) for path in args.keep or []}
    empty = [name for name, pairs in keep.items() if not pairs]
    if empty:
        print(f"error: --keep {empty[0]}: no usable labelled crop", file=sys.stderr)
        return 2
    summary = finetune(train, val, args.output, settings, source, progress=not args.no_progress, keep=keep)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
