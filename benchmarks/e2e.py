"""End-to-end reading of whole photos: detection + recognition, ICDAR 2015 protocol.

``python -m benchmarks.e2e SET... --readers project project+llm rapidocr3 [--lexicon]``

A SET is a folder with ``images/`` and ``gts/gt_<stem>.txt`` (ICDAR 2015 layout: one word a
line, ``x1,y1,x2,y2,x3,y3,x4,y4,WORD``; ``lexicons/<stem>.txt``, one word a line, for
word spotting). Scoring follows ICDAR 2015 task 4.4 (end to end, generic vocabulary):

* texts are compared after lowercasing and removing one leading and one trailing character
  of :data:`STRIP`;
* ground truth ``###`` and words under 3 characters are "don't care"; a prediction with
  over half of its area on a don't-care region is dropped;
* a prediction and a ground-truth word are paired (one to one, in order) when their
  polygons' IoU exceeds 0.5; a pair counts when the texts are equal;
* precision = counted / predictions kept, recall = counted / ground-truth words cared for,
  hmean their harmonic mean.

With ``--lexicon`` each prediction is also replaced by its photo's lexicon word at the
smallest edit distance (ties: the first listed), dropped when that distance is over half
the word's length (nothing of the lexicon was spotted), and scored the same way (word
spotting). Every reader reads every photo at batch 1, readers interleaved photo by photo
(who goes first rotates), and seconds per photo are reported per reader.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import clean_nan, machine, machine_line, markdown_table, median, paired_ratio, print_json, rotate

STRIP = "!?.:,*\"()·[]/'"
READERS = ("project", "project+llm", "rapidocr3")
#: also accepted: the LLM prompted with the other words of the line (the measurement of
#: runtime.detect.settings.DetectorSettings.llm_context), and the correction without a
#: language model (``--llm lexicon``)
EXTRA_READERS = ("project+llm+context", "project+lexicon")
IOU = 0.5
DONT_CARE_AREA = 0.5
MIN_CHARS = 3

Polygon = list[tuple[float, float]]
Word = tuple[Polygon, str]


def normalise(text: str) -> str:
    """Lowercase, one leading and one trailing character of :data:`STRIP` removed."""
    text = text.lower()
    if text and text[0] in STRIP:
        text = text[1:]
    if text and text[-1] in STRIP:
        text = text[:-1]
    return text


@dataclass
class Photo:
    stem: str
    path: Path
    truth: list[Word]
    lexicon: list[str] = field(default_factory=list)


def read_gt(path: Path) -> list[Word]:
    """``x1,y1,...,x4,y4,WORD`` lines (the word may hold commas; a UTF-8 BOM is dropped)."""
    words = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        parts = line.strip().split(",", 8)
        if len(parts) < 9:
            continue
        xy = [float(v) for v in parts[:8]]
        words.append(([(xy[i], xy[i + 1]) for i in range(0, 8, 2)], parts[8]))
    return words


def load_photos(folder: Path, limit: int | None = None) -> list[Photo]:
    images = folder / "images"
    if not images.is_dir():
        raise SystemExit(f"error: {folder}: no images/ folder")
    photos = []
    for path in sorted(p for p in images.iterdir() if p.is_file()):
        gt = folder / "gts" / f"gt_{path.stem}.txt"
        if not gt.is_file():
            continue
        lex = folder / "lexicons" / f"{path.stem}.txt"
        lexicon = ([w.strip() for w in lex.read_text(encoding="utf-8").splitlines() if w.strip()]
                   if lex.is_file() else [])
        photos.append(Photo(path.stem, path, read_gt(gt), lexicon))
    return photos[:limit] if limit else photos


# -- scoring ---------------------------------------------------------------------------


def _shape(polygon: Polygon) -> Any:
    from shapely.geometry import Polygon as Shape

    shape = Shape(polygon)
    return shape if shape.is_valid else shape.buffer(0)


def _iou(a: Any, b: Any) -> float:
    union = a.union(b).area
    return a.intersection(b).area / union if union > 0 else 0.0


@dataclass
class Tally:
    counted: int = 0
    predictions: int = 0
    truths: int = 0

    def add(self, other: Tally) -> None:
        self.counted += other.counted
        self.predictions += other.predictions
        self.truths += other.truths

    def as_dict(self) -> dict[str, Any]:
        p = 100.0 * self.counted / self.predictions if self.predictions else 0.0
        r = 100.0 * self.counted / self.truths if self.truths else 0.0
        h = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 2), "recall": round(r, 2), "hmean": round(h, 2), "counted": self.counted,
                "predictions": self.predictions, "truths": self.truths}


def score_photo(truth: Sequence[Word], predicted: Sequence[Word]) -> Tally:
    """One photo, ICDAR 2015 end to end (see the module docstring)."""
    gts = [(_shape(p), t) for p, t in truth]
    care = [t != "###" and len(normalise(t)) >= MIN_CHARS for _, t in truth]
    preds = [(_shape(p), t) for p, t in predicted if len(p) >= 3]
    kept = []
    for shape, text in preds:
        area = shape.area
        on_dont_care = any(not c and area > 0 and shape.intersection(g).area / area > DONT_CARE_AREA
                           for (g, _), c in zip(gts, care))
        if not on_dont_care:
            kept.append((shape, text))
    tally = Tally(predictions=len(kept), truths=sum(care))
    used_gt, used_pred = set(), set()
    for i, ((g, gt_text), c) in enumerate(zip(gts, care)):
        if not c:
            continue
        for j, (shape, text) in enumerate(kept):
            if i in used_gt or j in used_pred:
                continue
            if _iou(g, shape) > IOU:
                used_gt.add(i)
                used_pred.add(j)
                tally.counted += normalise(text) == normalise(gt_text)
    return tally


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def spot(predicted: Sequence[Word], lexicon: Sequence[str]) -> list[Word]:
    """Predictions snapped to the nearest lexicon word; those too far from every word dropped."""
    if not lexicon:
        return []
    out = []
    for polygon, text in predicted:
        norm = normalise(text)
        best = min(lexicon, key=lambda w: edit_distance(norm, normalise(w)))
        if edit_distance(norm, normalise(best)) <= len(normalise(best)) / 2:
            out.append((polygon, best))
    return out


# -- readers ---------------------------------------------------------------------------

ReadPhoto = Callable[[Path], list[Word]]


def project_reader(llm: str, engine: str | None, threads: int | None,
                   context: bool | None = None) -> tuple[ReadPhoto, Any]:
    """This project's photo reader (``llm``: an ``--llm`` value: none, default, lexicon)."""
    from runtime.detect.photo import read_photos
    from runtime.detect.settings import detector_settings
    from runtime.recognizer import Recognizer

    recognizer = Recognizer.from_bundle(engine, llm=llm, threads=threads)
    settings = detector_settings(recognizer.bundle.manifest)
    if context is not None:
        settings = settings.with_changes(llm_context=context)

    def read(path: Path) -> list[Word]:
        result = read_photos(recognizer, [path], batch_size=32, settings=settings)[0]
        if result.error:
            raise RuntimeError(result.error)
        stats["words"] += len(result.words)
        stats["gated"] += sum(w.gated for w in result.words)
        stats["llm_changed"] += sum(w.llm_changed for w in result.words)
        return [([tuple(p) for p in w.polygon], w.text) for w in result.words]

    stats = {"words": 0, "gated": 0, "llm_changed": 0}
    read.stats = stats  # type: ignore[attr-defined]
    return read, recognizer


def rapidocr3_reader(threads: int | None) -> tuple[ReadPhoto, Any]:
    from benchmarks.readers import rapidocr3_engine

    engine = rapidocr3_engine(threads)

    def read(path: Path) -> list[Word]:
        output = engine(str(path), return_word_box=True)
        words = []
        for line in output.word_results or ():
            for item in line or ():
                if len(item) != 3:  # an empty detection gives empty entries
                    continue
                text, _score, box = item
                if text and box is not None and len(box) == 4:
                    words.append(([(float(x), float(y)) for x, y in box], str(text)))
        return words

    return read, engine


def make_reader(name: str, engine: str | None, threads: int | None) -> ReadPhoto:
    if name == "project":
        return project_reader("none", engine, threads)[0]
    if name == "project+llm":
        return project_reader("default", engine, threads)[0]
    if name == "project+lexicon":
        return project_reader("lexicon", engine, threads)[0]
    if name == "project+llm+context":
        return project_reader("default", engine, threads, context=True)[0]
    if name == "rapidocr3":
        return rapidocr3_reader(threads)[0]
    raise SystemExit(f"error: unknown reader {name!r} (choose from {', '.join(READERS)})")


# -- the run ---------------------------------------------------------------------------


def run_set(photos: list[Photo], readers: dict[str, ReadPhoto], lexicon: bool,
            predictions_out: Any | None = None, progress: bool = True) -> dict[str, Any]:
    names = list(readers)
    generic = {n: Tally() for n in names}
    spotted = {n: Tally() for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    errors = {n: 0 for n in names}
    for k, photo in enumerate(photos):
        for name in rotate(names, k):
            start = time.perf_counter()
            try:
                words = readers[name](photo.path)
            except Exception as exc:  # one photo failing is counted, the run goes on
                words = []
                errors[name] += 1
                print(f"warning: {name} {photo.path}: {exc}", file=sys.stderr)
            seconds[name].append(time.perf_counter() - start)
            generic[name].add(score_photo(photo.truth, words))
            if lexicon and photo.lexicon:
                spotted[name].add(score_photo(photo.truth, spot(words, photo.lexicon)))
            if predictions_out is not None:
                predictions_out.write(json.dumps({"reader": name, "photo": photo.stem, "seconds": seconds[name][-1],
                                                  "words": [[list(map(list, p)), t] for p, t in words]}) + "\n")
        if progress and (k + 1) % 25 == 0:
            print(f"  {k + 1}/{len(photos)} photos", file=sys.stderr, flush=True)
    base = names[-1] if "rapidocr3" not in names else "rapidocr3"
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {"generic": generic[name].as_dict(), "seconds_per_photo": sum(seconds[name]) / len(photos),
                     "median_seconds": median(seconds[name]), "errors": errors[name],
                     f"time_vs_{base}": paired_ratio(seconds[name], seconds[base])}
        if lexicon:
            out[name]["lexicon"] = spotted[name].as_dict()
        if getattr(readers[name], "stats", None) is not None:
            out[name]["words"] = dict(readers[name].stats)  # type: ignore[attr-defined]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", metavar="SET", help="folder with images/ and gts/ (and lexicons/)")
    parser.add_argument("--readers", nargs="+", default=list(READERS), metavar="READER",
                        help=f"who reads ({', '.join(READERS)}; default: all)")
    parser.add_argument("--lexicon", action="store_true", help="also score word spotting with the per-photo lexicons")
    parser.add_argument("--engine", metavar="BUNDLE", help="the project's bundle (default: the embedded one)")
    parser.add_argument("--threads", type=int, metavar="N", help="onnxruntime threads for every reader")
    parser.add_argument("--limit", type=int, metavar="N", help="the first N photos of each set")
    parser.add_argument("--predictions", metavar="FILE", help="write every reader's words per photo (JSON lines)")
    parser.add_argument("--rescore", metavar="FILE", help="score a --predictions file again instead of reading")
    return parser


def rescore(path: str, folders: list[Path], lexicon: bool) -> dict[str, Any]:
    """Scores of a ``--predictions`` file (readers as recorded, photos of ``folders``): only
    photos every reader has read count (an interrupted run is scored on what it finished)."""
    photos = {p.stem: p for folder in folders for p in load_photos(folder)}
    records: dict[str, dict[str, Any]] = {}
    readers: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["photo"] in photos:
            records.setdefault(record["photo"], {})[record["reader"]] = record
            if record["reader"] not in readers:
                readers.append(record["reader"])
    complete = [stem for stem, by in records.items() if len(by) == len(readers)]
    generic = {name: Tally() for name in readers}
    spotted = {name: Tally() for name in readers}
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    for stem in complete:
        photo = photos[stem]
        for name in readers:
            record = records[stem][name]
            words = [([tuple(p) for p in poly], text) for poly, text in record["words"]]
            generic[name].add(score_photo(photo.truth, words))
            if lexicon and photo.lexicon:
                spotted[name].add(score_photo(photo.truth, spot(words, photo.lexicon)))
            seconds[name].append(float(record["seconds"]))
    base = "rapidocr3" if "rapidocr3" in readers else readers[-1]
    return {"photos": len(complete), "readers": {
        name: {"generic": generic[name].as_dict(), "seconds_per_photo": sum(seconds[name]) / max(1, len(complete)),
               f"time_vs_{base}": paired_ratio(seconds[name], seconds[base]),
               **({"lexicon": spotted[name].as_dict()} if lexicon else {})}
        for name in readers}}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.readers:
        if name not in READERS + EXTRA_READERS:
            print(f"error: unknown reader {name!r} (choose from {', '.join(READERS)})", file=sys.stderr)
            return 2
    folders = [Path(s) for s in args.sets]
    for folder in folders:
        if not (folder / "images").is_dir() or not (folder / "gts").is_dir():
            print(f"error: {folder}: not a photo set (needs images/ and gts/)", file=sys.stderr)
            return 2
    if args.rescore:
        print_json(clean_nan({"rescored": rescore(args.rescore, folders, args.lexicon)}))
        return 0
    try:
        readers = {name: make_reader(name, args.engine, args.threads) for name in args.readers}
    except (ImportError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = machine()
    print(machine_line(info), file=sys.stderr)
    results: dict[str, Any] = {}
    sink = open(args.predictions, "w", encoding="utf-8") if args.predictions else None  # noqa: SIM115
    try:
        for folder in folders:
            photos = load_photos(folder, args.limit)
            print(f"{folder.name}: {len(photos)} photos", file=sys.stderr)
            results[folder.name] = {"photos": len(photos), "readers": run_set(photos, readers, args.lexicon, sink)}
    finally:
        if sink is not None:
            sink.close()
    rows = []
    for set_name, data in results.items():
        for reader, r in data["readers"].items():
            lex = r.get("lexicon", {})
            rows.append([set_name, reader, f"{r['generic']['recall']:.2f}", f"{r['generic']['precision']:.2f}",
                         f"{r['generic']['hmean']:.2f}", f"{lex['recall']:.2f}" if lex else "-",
                         f"{r['seconds_per_photo']:.3f}",
                         f"{next(v for k, v in r.items() if k.startswith('time_vs')):.2f}"])
    print(markdown_table(["set", "reader", "recall", "precision", "hmean", "lexicon recall", "s/photo",
                          "time ratio"], rows), file=sys.stderr)
    print_json(clean_nan({"e2e": results, "machine": info, "protocol": "ICDAR 2015 task 4.4 end to end, generic",
                          "threads": args.threads, "numpy": np.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
