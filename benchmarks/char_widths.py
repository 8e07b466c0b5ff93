"""Fit the relative character widths the CTC gap rule uses (``runtime/assets/char_widths.json``).

    python -m benchmarks.char_widths [--work DIR] [--out FILE]

From the cached predictions of ``python -m benchmarks.correction predict``: the real IC15 and
SVT training crops the default model reads right (never IIIT5K, whose words the occluded
sets are made of), three characters or more. The distance between the centres of two
neighbouring characters (in CTC frames) is modelled as the word's pitch times the mean
width of the two; pitch per word and width per character are fitted in turn by least
squares, widths scaled so that the median character is 1.0. Characters seen fewer than
:data:`MIN_COUNT` times are left out (the runtime counts them 1.0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.correction.settings import CHAR_WIDTHS_FILE as CHAR_WIDTHS

ROOT = Path(__file__).resolve().parents[1]
#: the training sets the widths are fitted on (folder names in the cache's image paths)
SOURCES = ("ic15_train_4468", "svt_train_257")
MIN_COUNT = 10
ROUNDS = 5
#: no character is taken to be narrower or wider than this (a few rare symbols)
LIMITS = (0.4, 2.0)


def training_words(store: dict) -> list[tuple[str, np.ndarray]]:
    """(label, character centres) of the :data:`SOURCES` crops of ``train_real`` read right."""
    images = store["images"]
    out = []
    for key, label in store["sets"]["train_real"]:
        entry = images[key]
        frames = entry.get("frames") or []
        if (any(f"/{name}/" in key for name in SOURCES) and entry["text"] == label and len(label) >= 3
                and len(frames) == len(label)):
            out.append((label, np.asarray(frames, dtype=np.float64)))
    return out


def fit(words: Sequence[tuple[str, np.ndarray]], rounds: int = ROUNDS) -> tuple[dict[str, float], float]:
    """Widths per character (median 1.0) and the spread (standard deviation of the log of
    observed / expected distance) they leave."""
    chars = sorted({c for label, _ in words for c in label})
    index = {c: i for i, c in enumerate(chars)}
    pairs = [(np.array([index[c] for c in label[:-1]]), np.array([index[c] for c in label[1:]]), np.diff(frames))
             for label, frames in words]
    widths = np.ones(len(chars))
    for _ in range(rounds):
        rows, targets = [], []
        for left, right, distances in pairs:
            pitch = np.median(distances / ((widths[left] + widths[right]) / 2))
            block = np.zeros((len(distances), len(chars)))
            np.add.at(block, (np.arange(len(distances)), left), 0.5)
            np.add.at(block, (np.arange(len(distances)), right), 0.5)
            rows.append(block)
            targets.append(distances / pitch)
        widths = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0]
        widths = widths / np.median(widths)
    residuals = []
    for left, right, distances in pairs:
        expected = (widths[left] + widths[right]) / 2
        residuals.append(np.log(distances / (np.median(distances / expected) * expected)))
    counts = Counter(c for label, _ in words for c in label)
    kept = {c: round(float(np.clip(widths[index[c]], *LIMITS)), 3) for c in chars if counts[c] >= MIN_COUNT}
    return kept, float(np.std(np.concatenate(residuals)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.char_widths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "correction")
    parser.add_argument("--out", type=Path, default=CHAR_WIDTHS)
    parser.add_argument("--bundle", type=Path,
                        help="also write the widths into this bundle's correction section (gaps.char_widths)")
    args = parser.parse_args(argv)
    store = json.loads((args.work / "predictions.json").read_text())
    words = training_words(store)
    if not words:
        print(f"error: no usable training crops in {args.work / 'predictions.json'}", file=sys.stderr)
        return 1
    widths, spread = fit(words)
    uniform = float(np.std(np.concatenate([np.log(np.diff(f) / np.median(np.diff(f))) for _, f in words])))
    args.out.write_text(json.dumps({
        "about": "relative advance widths of characters in the default tower's CTC frames (median "
                 "character 1.0), fitted by python -m benchmarks.char_widths",
        "source": f"{len(words)} correctly read crops of {', '.join(SOURCES)}",
        "log_spread": {"uniform": round(uniform, 4), "fitted": round(spread, 4)},
        "widths": dict(sorted(widths.items(), key=lambda kv: kv[1])),
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(widths)} widths from {len(words)} crops; log spread {uniform:.3f} uniform -> {spread:.3f} "
          f"fitted; wrote {args.out}")
    if args.bundle is not None:
        write_widths(args.bundle, widths)
        print(f"wrote them into {args.bundle / 'manifest.json'} (correction.gaps.char_widths)")
    return 0


def write_widths(bundle: Path, widths: dict[str, float]) -> None:
    """Put ``widths`` into ``bundle``'s manifest (``correction.gaps.char_widths``, schema 2)."""
    from benchmarks.correction import write_section

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    section = dict(manifest.get("correction") or {})
    section["gaps"] = {**section.get("gaps", {}), "char_widths": dict(sorted(widths.items(), key=lambda kv: kv[1]))}
    write_section(bundle, section)


if __name__ == "__main__":
    sys.exit(main())
