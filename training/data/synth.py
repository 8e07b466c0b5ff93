"""Synthetic word images, on the fly or written to an LMDB.

``SynthWords(n, seed)`` is a torch ``Dataset`` whose item ``i`` is always the same
``(PIL RGB image, label)`` for a given seed (or ``(transform(image), label)``): the text
comes from :class:`.words.WordSampler`, the picture from :class:`.render.WordRenderer`.
Labels are already normalised for the charset (:func:`runtime.charset.normalize_label`).

Command line::

    python -m training.data.synth -n 100000 -o data/synth --seed 0 [-j 2]
    python -m training.data.synth --sheet /tmp/synth_sheet.png     # 48 samples, labelled
    python -m training.data.synth --bench 500                      # samples/s, 32x128
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import get_all_start_methods, get_context
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from runtime.charset import MAX_LABEL_LENGTH, normalize_label

from .render import WordRenderer, check_difficulty
from .words import WordSampler


class SynthWords(Dataset):
    """``num_samples`` synthetic word crops; item ``i`` depends only on ``(seed, i)``."""

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        charset: str = "94",
        max_length: int = MAX_LABEL_LENGTH,
        transform: Callable[[Image.Image], Any] | None = None,
        difficulty: float = 1.0,
        cover_counts: tuple[int, ...] = (),
    ) -> None:
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.charset = charset
        self.max_length = max_length
        self.transform = transform
        self.difficulty = check_difficulty(difficulty)  # now, not in a worker at the first item
        #: each item hides this many inner characters (one count drawn per item, among those
        #: the word is long enough for: at least 2k + 1 characters), as the occlusion
        #: benchmark does to real crops; empty: nothing hidden
        self.cover_counts = tuple(int(k) for k in cover_counts)
        if any(k < 1 for k in self.cover_counts):
            raise ValueError("cover counts must be positive")
        self.name = f"synth:{num_samples}:{seed}" + (f":{difficulty:g}" if difficulty != 1.0 else "")
        if self.cover_counts:
            self.name += ":cover" + "-".join(map(str, self.cover_counts))
        self.num_dropped = 0
        self._words: WordSampler | None = None
        self._renderer: WordRenderer | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict:  # worker processes build their own caches
        state = dict(self.__dict__)
        state["_words"] = state["_renderer"] = None
        return state

    def sample(self, index: int) -> tuple[Image.Image, str]:
        """The raw ``(image, label)`` of item ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._words is None:
            self._words = WordSampler(self.charset, self.max_length)
            self._renderer = WordRenderer(difficulty=self.difficulty)
        assert self._renderer is not None
        rng = random.Random(f"{self.seed}:{index}")
        gen = np.random.default_rng([self.seed, index])
        for _ in range(20):
            text = self._words(rng)
            label = normalize_label(text, self.charset, self.max_length)
            if label is None:
                continue
            image = self._renderer.render(text, rng, gen, self.covered(text, index))
            if image is not None:
                return image, label
        raise RuntimeError(f"could not render a word for item {index} (seed {self.seed})")

    def covered(self, text: str, index: int) -> tuple[int, ...]:
        """Inner positions of ``text`` to hide in item ``index`` (drawn from their own
        generator, so the word and the picture are those of the uncovered item)."""
        counts = [k for k in self.cover_counts if len(text) >= 2 * k + 1]
        if not counts:
            return ()
        rng = random.Random(f"{self.seed}:{index}:cover")
        return tuple(sorted(rng.sample(range(1, len(text) - 1), rng.choice(counts))))

    def __getitem__(self, index: int):
        image, label = self.sample(index)
        return (self.transform(image) if self.transform else image), label


def contact_sheet(dataset: SynthWords, count: int = 48, cols: int = 4,
                  cell: tuple[int, int] = (256, 64)) -> Image.Image:
    """A grid of the first ``count`` items, each resized to ``cell`` with its label below."""
    rows = (count + cols - 1) // cols
    w, h = cell
    sheet = Image.new("RGB", (cols * (w + 6), rows * (h + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(count):
        image, label = dataset.sample(i)
        x, y = (i % cols) * (w + 6), (i // cols) * (h + 18)
        sheet.paste(image.resize(cell, Image.Resampling.BICUBIC), (x, y))
        draw.text((x + 2, y + h + 2), f"{label}  {image.size[0]}x{image.size[1]}", fill="black")
    return sheet


_WRITER_SETS: dict[tuple[int, str, int, float], SynthWords] = {}


def _encode_range(args: tuple[int, int, int, str, int, float]) -> list[tuple[bytes, str]]:
    start, stop, seed, charset, max_length, difficulty = args
    key = (seed, charset, max_length, difficulty)
    if key not in _WRITER_SETS:  # one per process: fonts and words load once
        _WRITER_SETS[key] = SynthWords(2**62, seed, charset, max_length, difficulty=difficulty)
    dataset = _WRITER_SETS[key]
    out = []
    for i in range(start, stop):
        image, label = dataset.sample(i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=3)
        out.append((buffer.getvalue(), label))
    return out


def iter_encoded(n: int, seed: int, charset: str, max_length: int, workers: int = 1,
                 chunk: int = 256, difficulty: float = 1.0) -> Iterator[tuple[bytes, str]]:
    """PNG bytes and labels of items ``0..n-1``, in order (``workers`` processes)."""
    jobs = [(s, min(s + chunk, n), seed, charset, max_length, difficulty) for s in range(0, n, chunk)]
    if workers <= 1:
        for job in jobs:
            yield from _encode_range(job)
        return
    method = "fork" if "fork" in get_all_start_methods() else "spawn"  # fork: no re-import of torch
    with get_context(method).Pool(workers) as pool:
        for part in pool.imap(_encode_range, jobs):
            yield from part


def benchmark(count: int = 500, height: int = 32, width: int = 128) -> dict[str, float]:
    """Samples per CPU-second on one core: rendering alone, and rendered + preprocessed.

    CPU time (not wall time) is measured, so other load on the machine matters less.
    """
    import torch

    from runtime.preprocess import Preprocessing

    from .transforms import ToModelInput

    torch.set_num_threads(1)
    dataset = SynthWords(2 * count + 40, seed=1234)
    for i in range(40):  # load fonts and words, warm the font cache
        dataset.sample(i)
    start = time.process_time()
    for i in range(40, 40 + count):
        dataset.sample(i)
    render = count / (time.process_time() - start)
    to_input = ToModelInput(Preprocessing(height, width))
    start = time.process_time()
    for i in range(40 + count, 40 + 2 * count):
        to_input(dataset.sample(i)[0])
    full = count / (time.process_time() - start)
    return {"render_per_cpu_s": render, f"render_and_preprocess_{height}x{width}_per_cpu_s": full}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num", type=int, default=1000, help="number of samples")
    parser.add_argument("-o", "--output", help="LMDB directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--charset", default="94", help="charset name or characters (default 94)")
    parser.add_argument("--max-length", type=int, default=MAX_LABEL_LENGTH)
    parser.add_argument("--difficulty", type=float, default=1.0,
                        help="0 = flat text on plain backgrounds ... 1 = every effect (default)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="processes for writing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing LMDB")
    parser.add_argument("--sheet", help="write a contact sheet PNG of 48 samples instead")
    parser.add_argument("--bench", type=int, metavar="N", help="measure samples/s over N samples")
    args = parser.parse_args(argv)

    if args.bench:
        for key, value in benchmark(args.bench).items():
            print(f"{key}: {value:.0f}")
        return 0
    if args.sheet:
        sheet_set = SynthWords(48, args.seed, args.charset, args.max_length, difficulty=args.difficulty)
        contact_sheet(sheet_set).save(args.sheet)
        print(f"wrote {args.sheet}")
        return 0
    if not args.output:
        parser.error("give -o OUT_DIR (or --sheet / --bench)")
    from .lmdb_io import write_lmdb

    start = time.perf_counter()
    samples = iter_encoded(args.num, args.seed, args.charset, args.max_length, args.workers,
                           difficulty=args.difficulty)
    written = write_lmdb(args.output, samples, overwrite=args.overwrite)
    print(f"wrote {written} samples to {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
