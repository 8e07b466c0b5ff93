"""Does the LLM correction earn its cost? Accuracy, fixed/broken, gate rate and time per set.

    python -m benchmarks.correction all [--work DIR]        # everything below, in order
    python -m benchmarks.correction prepare [--work DIR]    # validation split + occluded sets
    python -m benchmarks.correction predict [--work DIR]    # the decoder's answers, cached
    python -m benchmarks.correction widths [--work DIR]     # character widths for the gap rule
    python -m benchmarks.correction gaps [--work DIR]       # CTC gap rules on the validation sets
    python -m benchmarks.correction tune [--work DIR]       # weights on the validation sets
    python -m benchmarks.correction learn [--work DIR]      # a learnt ranking against them
    python -m benchmarks.correction sweep [--work DIR]      # thresholds 0.5 .. 0.95
    python -m benchmarks.correction table [--work DIR]      # per set: none / top-k / +lexicon / fill
    python -m benchmarks.correction timing [--work DIR]     # LLM ms per gated word, pipeline ratio

Sets (``--work``, default ``runs/correction``, holds what is derived from them; the
images stay outside the repository): the test sets IC13-857, IC13-1015, SVT-647 and
misc_real (reported only, never tuned on); ``val_real``, the 348 real scene-text crops the
default model was validated on while training (the cache's 5% split, seed 0: the model
never trained on them); ``train_real``, the other 6,377 real scene-text training crops
(the model trained on them and reads 89% right: they show how often correct words are
broken); ``train_bd``, the 4,182 born-digital training crops (clean text with real symbols
and abbreviations, the same check; never a scene-text score); occluded IIIT5K-train words
(``benchmarks.occlusion``: 1 and 2 inner characters covered), split by word into a
validation part (the IIIT5K words of ``val_real`` plus a seeded quarter of the others) and
a reported part (the rest: words whose uncovered crops the model *did* train on). ``prepare`` needs the ``train`` extra
(it reproduces the training split); the rest needs the runtime and the ``llm`` extra.

``predict`` reads every crop once at batch 1 without the LLM and stores each word's text,
character probabilities, top-k, character frames and (``ctc.npz``) the tower's CTC
log-probabilities; every later step runs the corrector on those cached
predictions, so a configuration costs only LLM time. Fixed = the vision answer was wrong
and the corrected one is right; broken = the reverse (protocol comparison: lower case,
``[0-9a-z]``).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import char_widths, occlusion
from benchmarks.common import fmt, machine, machine_line, markdown_table, percentile
from runtime.charset import word_correct
from runtime.decoding import Prediction, find_gaps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TRAIN = DATA / "train"
IIIT5K = TRAIN / "iiit5k_train_2000"
#: the born-digital training crops (clean text with real symbols and abbreviations: a
#: check that the corrector leaves such words alone; never a scene-text score)
BORN_DIGITAL = "ic13_borndigital_4188"
#: the real training sets of the default model's feature cache, in its order (training.frozen_tower)
TRAIN_SETS = ("ic15_train_4468", "iiit5k_train_2000", "svt_train_257", BORN_DIGITAL)
TEST_SETS = {
    "ic13_857": DATA / "eval/ic13/labels_857.tsv",
    "ic13_1015": DATA / "eval/ic13/labels_1015.tsv",
    "svt_647": DATA / "eval/svt_test_647",
    "misc_real": DATA / "eval/misc_real",
}
VAL_SETS = ("val_real", "val_occ1", "val_occ2", "train_real", "train_bd")
OCC_SETS = ("occ1", "occ2")
#: share of the other IIIT5K words added to the occlusion validation part
OCC_VAL_SHARE = 0.25
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


# -- prepare ---------------------------------------------------------------------------

def carve_val_real(work: Path, val_fraction: float = 0.05, seed: int = 0) -> list[tuple[str, str, str]]:
    """The default model's validation crops: (set, file, label), as training.frozen_tower cut them."""
    import numpy as np

    from training.data.readers import ConcatSets, open_set

    sets = [open_set(TRAIN / name, "94", 25, train=True) for name in TRAIN_SETS]
    real = ConcatSets(sets)
    order = np.random.default_rng(seed).permutation(len(real))
    out = []
    for i in order[: int(round(len(real) * val_fraction))] if val_fraction > 0 else order:
        k = bisect.bisect_right(real.cumulative_sizes, int(i))
        j = int(i) - (real.cumulative_sizes[k - 1] if k else 0)
        if "borndigital" in TRAIN_SETS[k]:
            continue
        out.append((TRAIN_SETS[k], sets[k].files[j], sets[k].labels[j]))
    return out


def prepare(work: Path) -> None:
    """Write ``val_real.tsv`` and the occluded sets (validation and reported parts)."""
    work.mkdir(parents=True, exist_ok=True)
    val = carve_val_real(work)
    lines = [f"{TRAIN / s / 'images' / f}\t{label}\n" for s, f, label in val]
    (work / "val_real.tsv").write_text("".join(lines), encoding="utf-8")
    held_out = {(s, f) for s, f, _ in val}
    rest = [(s, f, label) for s, f, label in carve_val_real(work, 0.0) if (s, f) not in held_out]
    lines = [f"{TRAIN / s / 'images' / f}\t{label}\n" for s, f, label in rest]
    (work / "train_real.tsv").write_text("".join(lines), encoding="utf-8")
    born_digital = TRAIN / BORN_DIGITAL
    lines = [f"{path}\t{label}\n" for path, label in read_labels(born_digital)]
    (work / "train_bd.tsv").write_text("".join(lines), encoding="utf-8")
    val_iiit = {f for s, f, _ in val if s == "iiit5k_train_2000"}
    files = [w.file for w in occlusion.read_charboxes(IIIT5K / "charboxes.tsv")]

    def in_val(name: str) -> bool:
        return name in val_iiit or zlib.crc32(name.encode()) % 1000 < OCC_VAL_SHARE * 1000

    val_files = [f for f in files if in_val(f)]
    test_files = [f for f in files if not in_val(f)]
    for part, chosen in (("val_occ", val_files), ("occ", test_files)):
        for k in (1, 2):
            n = occlusion.build(IIIT5K, work / f"{part}{k}", counts=(k,), files=chosen)
            print(f"{part}{k}: {n} occluded crops", file=sys.stderr)
    print(f"val_real: {len(val)} crops; occlusion words: {len(val_files)} validation, {len(test_files)} reported",
          file=sys.stderr)


def set_paths(work: Path) -> dict[str, Path]:
    """Every set by name: the test sets, the validation sets and the reported occluded sets."""
    paths = dict(TEST_SETS)
    paths["val_real"] = work / "val_real.tsv"
    paths["train_real"] = work / "train_real.tsv"
    paths["train_bd"] = work / "train_bd.tsv"
    for name in ("val_occ1", "val_occ2", "occ1", "occ2"):
        paths[name] = work / name
    return paths


def read_labels(path: Path) -> list[tuple[Path, str]]:
    """(image path, label) of a folder set or labels .tsv (absolute or image-folder paths)."""
    tsv = path / "labels.tsv" if path.is_dir() else path
    folder = tsv.parent / "images"
    out = []
    for line in tsv.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, label = line.split("\t", 1)
            image = Path(name) if Path(name).is_absolute() else folder / name
            out.append((image, label))
    return out


# -- predict ---------------------------------------------------------------------------

class Capture:
    """A :class:`runtime.correction.contract.Corrector` that reviews nothing and keeps the
    last batch's predictions (``predictions``): what the decoder read, CTC outputs included."""

    mode = "rescore"

    def __init__(self) -> None:
        self.predictions: list[Prediction] = []

    def correct(self, predictions: Sequence[Prediction], charset: str) -> list[Any]:
        from runtime.correction.contract import Correction, Skip

        self.predictions[:] = predictions
        return [Correction(p.text, p.text, False, False, "none", skipped=Skip.NOT_REVIEWED) for p in predictions]


@dataclass
class Word:
    """One crop's label and the decoder's prediction."""

    label: str
    prediction: Prediction
    #: milliseconds the recognizer took at batch 1 without LLM (NaN when shared from another set)
    vision_ms: float = float("nan")


def predict(work: Path, names: Sequence[str] | None = None, engine: str | None = None) -> None:
    """Read every crop once (batch 1, no LLM) and store the predictions in ``predictions.json``."""
    from PIL import Image

    from runtime.charset import keep_for_eval
    from runtime.recognizer import Recognizer

    recognizer = Recognizer.from_bundle(engine, llm="none")
    capture = Capture()
    recognizer.corrector = capture  # keeps the decoder's predictions, changes nothing
    captured = capture.predictions
    cache_path = work / "predictions.json"
    store: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    ctc = read_ctc(work)
    images: dict[str, dict] = store.setdefault("images", {})
    sets: dict[str, list[list[str]]] = store.setdefault("sets", {})
    store["charset"] = recognizer.codec.charset
    store["threshold"] = recognizer.threshold
    paths = set_paths(work)
    for name in names or list(paths):
        entries = [(p, label) for p, label in read_labels(paths[name]) if keep_for_eval(label)]
        start = time.perf_counter()
        for image_path, _ in entries:
            key = str(image_path)
            if key in images:
                continue
            with Image.open(image_path) as opened:
                picture = opened.convert("RGB")
            t0 = time.perf_counter()
            result = recognizer.read([picture], batch_size=1)[0]
            ms = 1000.0 * (time.perf_counter() - t0)
            if result.error:
                print(f"warning: {key}: {result.error}", file=sys.stderr)
                continue
            p = captured[0]
            images[key] = {"ms": ms, "text": p.text, "probs": p.char_probs, "topk": p.topk,
                           "frames": p.char_frames}
            if p.ctc_log_probs is not None:
                ctc[key] = p.ctc_log_probs
        sets[name] = [[str(p), label] for p, label in entries if str(p) in images]
        print(f"{name}: {len(sets[name])} crops in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        cache_path.write_text(json.dumps(store))
        write_ctc(work, ctc)
    recognizer.close()


def read_ctc(work: Path) -> dict[str, Any]:
    """The stored CTC log-probabilities per image (``ctc.npz``; empty when there is none)."""
    import numpy as np

    path = work / "ctc.npz"
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {str(key): data[f"a{i}"].astype(np.float32) for i, key in enumerate(data["keys"])}


def write_ctc(work: Path, ctc: dict[str, Any]) -> None:
    """Store the CTC log-probabilities per image (float16, compressed)."""
    import numpy as np

    arrays = {f"a{i}": np.asarray(v, dtype=np.float16) for i, v in enumerate(ctc.values())}
    np.savez_compressed(work / "ctc.npz", keys=np.array(list(ctc)), **arrays)


def cached_prediction(entry: dict[str, Any], ctc: Any = None, **gap_rule: float) -> Prediction:
    """A stored prediction, its gaps found again from its character frames (``gap_rule``:
    :func:`runtime.decoding.find_gaps` arguments); ``ctc``: its CTC log-probabilities."""
    frames = entry.get("frames") or []
    return Prediction(entry["text"], entry["probs"], [[(c, p) for c, p in row] for row in entry["topk"]],
                      frames, find_gaps(frames, **gap_rule, text=entry["text"]), ctc)


def load_words(work: Path, **gap_rule: float) -> tuple[dict[str, list[Word]], dict]:
    """The cached predictions per set (gaps by ``gap_rule``: :func:`runtime.decoding.find_gaps`
    arguments, default the runtime's), and the store's metadata (charset, threshold)."""
    store = json.loads((work / "predictions.json").read_text())
    images = store["images"]
    ctc = read_ctc(work)
    out = {}
    for name, entries in store["sets"].items():
        out[name] = [Word(label, cached_prediction(images[key], ctc.get(key), **gap_rule), images[key]["ms"])
                     for key, label in entries]
    return out, {"charset": store["charset"], "threshold": store["threshold"]}



# -- gaps ------------------------------------------------------------------------------

#: the gap rules compared by the ``gaps`` step (runtime.decoding.find_gaps arguments)
GAP_GRID = {"ratio": (1.5, 1.6, 1.7, 1.8, 2.0), "min_extra": (0.0, 1.5, 2.0, 2.5), "prior": (2.5, 3.0),
            "min_distances": (3, 4)}


def insertion_slots(read: str, label: str, most: int = 2) -> set[int]:
    """Inner slots of ``read`` (index of the character the insert goes before) where inserting
    1..``most`` characters gives ``label`` (case folded); empty when no insertion does."""
    read, label = read.lower(), label.lower()
    extra = len(label) - len(read)
    out: set[int] = set()
    if not 1 <= extra <= most:
        return out

    def walk(i: int, j: int, used: tuple[int, ...]) -> None:
        if j == len(label):
            if i == len(read):
                out.update(used)
            return
        if i < len(read) and read[i] == label[j]:
            walk(i + 1, j + 1, used)
        if len(used) < extra:
            walk(i, j + 1, (*used, i))

    walk(0, 0, ())
    return {slot for slot in out if 0 < slot < len(read)}


def gap_report(work: Path) -> list[dict[str, Any]]:
    """How well each gap rule (:data:`GAP_GRID`) finds the characters the reader skipped on
    the validation sets: words with a skipped inner character, those with a gap at its slot
    (hits), and correctly read words with a gap (false alarms, each one a gated word)."""
    store = json.loads((work / "predictions.json").read_text())
    images, sets = store["images"], store["sets"]
    rows = []
    for values in itertools.product(*GAP_GRID.values()):
        rule = dict(zip(GAP_GRID, values, strict=True))
        row: dict[str, Any] = {"rule": rule}
        for name in VAL_SETS:
            skipped = hits = alarms = flagged = right = 0
            for key, label in sets[name]:
                entry = images[key]
                gaps = find_gaps(entry.get("frames") or [], **rule, text=entry["text"])
                flagged += bool(gaps)
                if word_correct(entry["text"], label):
                    right += 1
                    alarms += bool(gaps)
                    continue
                truth = insertion_slots(entry["text"], label)
                skipped += bool(truth)
                hits += bool(truth & {g.slot for g in gaps})
            row[name] = {"n": len(sets[name]), "right": right, "skipped": skipped, "hits": hits,
                         "alarms": alarms, "flagged": flagged}
        rows.append(row)
    (work / "gaps.json").write_text(json.dumps(rows, indent=1))
    header = [*GAP_GRID, *[f"{n}: flagged / skipped / hits / false alarms" for n in VAL_SETS]]
    print(markdown_table(header, [[*r["rule"].values(),
                                   *[f"{r[n]['flagged']} / {r[n]['skipped']} / {r[n]['hits']} / {r[n]['alarms']}"
                                     for n in VAL_SETS]] for r in rows]))
    return rows


# -- evaluate --------------------------------------------------------------------------

class MemoBackend:
    """An LLM backend that remembers each continuation's score (for tuning: a word's score
    does not depend on the other candidates it is batched with)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = backend.name
        self.memo: dict[tuple[str, str], float] = {}

    def score(self, prefix: str, continuations: Sequence[str], deadline: float | None = None) -> list[float]:
        missing = [c for c in dict.fromkeys(continuations) if (prefix, c) not in self.memo]
        if missing:
            for c, v in zip(missing, self.backend.score(prefix, missing, None), strict=True):
                self.memo[(prefix, c)] = v
        return [self.memo[(prefix, c)] for c in continuations]

    def fill(self, prompt: str, grammar: str, max_tokens: int, deadline: float | None = None) -> str:
        return self.backend.fill(prompt, grammar, max_tokens, deadline)


def evaluate(corrector: Any, words: Sequence[Word], charset: str) -> dict[str, Any]:
    """Accuracy without and with the corrector, gate rate, changed/fixed/broken, LLM ms."""
    n = len(words)
    right_before = right_after = gated = changed = fixed = broken = calls = reachable = 0
    ms: list[float] = []
    for word in words:
        correction = corrector.correct_one(word.prediction, charset)
        before = word_correct(word.prediction.text, word.label)
        after = word_correct(correction.text, word.label)
        right_before += before
        right_after += after
        reachable += before or any(word_correct(c.text, word.label) for c in correction.candidates)
        if correction.gated:
            gated += 1
            ms.append(1000.0 * correction.time_s)
        calls += correction.llm_called
        changed += correction.changed
        fixed += after and not before
        broken += before and not after
    return {"n": n, "vision": 100.0 * right_before / max(1, n), "accuracy": 100.0 * right_after / max(1, n),
            "gate_rate": 100.0 * gated / max(1, n), "gated": gated, "llm_calls": calls, "changed": changed,
            "fixed": fixed, "broken": broken,
            #: words read right, or whose right answer was among the corrector's candidates (a ceiling)
            "reachable": 100.0 * reachable / max(1, n),
            "llm_ms_median": statistics.median(ms) if ms else 0.0,
            "llm_ms_p95": percentile(ms, 95) if ms else 0.0, "llm_ms_total": sum(ms)}


#: the variants of the per-set table: (column, model (None: the --llm one), mode, lexicon, extra settings)
VARIANTS = (
    ("rescore top-k", None, "rescore", "none", {"inserts": 0}),
    ("rescore + lexicon", None, "rescore", "default", {}),
    ("lexicon, no LLM", "lexicon", "rescore", "default", {}),
    ("fill", None, "fill", "none", {}),
)


def make_corrector(llm: str, mode: str, lexicon: str, settings: dict[str, Any], memo: MemoBackend | None = None):
    """A corrector (``llm``: a GGUF, "default" or "lexicon"; ``memo``: reuse that backend's
    remembered scores)."""
    from runtime.llm import Corrector

    corrector = Corrector.from_spec(llm, mode=mode, lexicon=lexicon, **settings)
    if not corrector.corrects:
        raise SystemExit(f"error: the LLM cannot be used: {corrector.unavailable}")
    if memo is not None and corrector.enabled:
        corrector.backend = memo
    return corrector


#: the gap rules the ``tune`` step tries (runtime.decoding.find_gaps arguments; the best
#: trade-offs of the ``gaps`` step). The pitch prior stays the runtime's
#: (runtime.decoding.PRIOR_PITCH): the corrector's weaker second gaps use it too
TUNE_GAP_RULES = ({"ratio": 1.5, "min_extra": 1.5}, {"ratio": 1.5, "min_extra": 2.0}, {"ratio": 1.6, "min_extra": 2.0})
#: the first stage of ``tune``: what decides which word wins. Candidates are scored by the
#: tower's CTC likelihood (``visual="ctc"``): on the validation sets it broke 29 training
#: crops where the decoder's per-position probabilities broke 71, for a few occluded words
#: less; inserting anywhere (credited more at CTC gaps) found more skipped characters than
#: inserting at gaps only; prior weight 1 beat 0.5 with either scoring
TUNE_AXES = {"gap_credit": (12.0, 14.0), "oov_logprob": (-17.0, -20.0), "keep_margin": (0.0, 1.0),
             "symbol_credit": (0.0, 4.0, 8.0)}
#: earlier rounds found insert_credit 6 better than 3 and gap_credit 18 worse than 12 or 14
#: (round 4: best totals 580 / 570 / 564), review_unknown=True better than False (with
#: oov_logprob -16 / -20) and short_margin 4 better than 1 or 8 (with keep_margin 0 to 2);
#: unknown_margin 1 in the first two stages (round 4 at LLM weight 0.5: train_real fixed - broken 107 / 107 / 106 /
#: 103 for 0 / 1 / 1.5 / 2 nats, the other sets unchanged), tuned in the third
TUNE_FIXED = {"visual": "ctc", "insert_at": "anywhere", "prior_weight": 1.0, "weight": 0.5, "review_unknown": True,
              "short_margin": 4.0, "unknown_margin": 1.0, "insert_credit": 6.0}
#: the second stage: how often the LLM is asked, and how much it counts
TUNE_LLM_AXES = {"llm_margin": (1.0, 2.0, 3.0), "weight": (0.0, 0.5, 1.0)}
#: the third stage: the margin a candidate in no lexicon needs over a read word in none (the
#: most words gained; on a tie the larger margin, which changes fewer words)
TUNE_UNKNOWN_MARGINS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
#: the real validation sets: none of their crops may end up broken more often than fixed
REAL_VAL = ("val_real", "train_real", "train_bd")


def _tune_row(base: Any, memo: MemoBackend, words: dict[str, list[Word]], charset: str, rule: dict[str, float],
              settings: dict[str, Any]) -> dict[str, Any]:
    corrector = base.with_settings(**settings)
    corrector.backend = memo
    per_set = {name: evaluate(corrector, words[name], charset) for name in VAL_SETS}
    gain = {name: r["fixed"] - r["broken"] for name, r in per_set.items()}
    row = {"gap_rule": rule, "settings": settings, "gain": gain, "total": sum(gain.values()),
           "gate_rate": {name: r["gate_rate"] for name, r in per_set.items()},
           "llm_calls": {name: r["llm_calls"] for name, r in per_set.items()}}
    print(json.dumps(row), file=sys.stderr)
    return row


#: the second stage takes the fewest LLM calls among the settings within this many words of
#: the best (an LLM call costs several crops' reading time; a word is 0.1% of the validation)
TUNE_LLM_TOLERANCE = 2


def _real_calls(row: dict[str, Any]) -> int:
    return sum(row["llm_calls"][name] for name in REAL_VAL)


def _tune_key(row: dict[str, Any]) -> tuple:
    """More real crops fixed than broken on each real validation set first, then the most
    words gained, then the fewest LLM calls on the real crops."""
    return (all(row["gain"][name] > 0 for name in REAL_VAL), row["total"], -_real_calls(row))


def provenance(work: Path, llm: str) -> dict[str, Any]:
    """Where tuned settings come from: the validation sets (and sizes), the LLM, date and commit."""
    import subprocess

    store = json.loads((work / "predictions.json").read_text())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"tool": "python -m benchmarks.correction tune",
            "data": {name: len(store["sets"].get(name, [])) for name in VAL_SETS},
            "llm": llm, "threshold": store.get("threshold"),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit}


def correction_section(flat: dict[str, Any], gap_rule: dict[str, float], origin: dict[str, Any]) -> dict[str, Any]:
    """A manifest's ``correction`` section (docs/bundle.md) from tuned flat settings and gap rule."""
    from runtime.correction.settings import CorrectionSettings

    settings = CorrectionSettings().with_flat(**{k: v for k, v in flat.items() if k not in ("threshold", "mode")})
    rule = {"ratio": "ratio", "min_extra": "min_extra", "prior": "prior_pitch", "min_distances": "min_distances"}
    settings = settings.merged({"gaps": {rule[k]: v for k, v in gap_rule.items()}})
    section = settings.to_dict()
    del section["threshold"], section["mode"]
    return {"provenance": origin, **section}


def write_section(bundle: Path, section: dict[str, Any]) -> None:
    """Put ``section`` into ``bundle``'s manifest as its ``correction`` section (schema 2); the
    bundle is loaded again to check it."""
    from runtime.bundle import CORRECTION_SCHEMA_VERSION, MANIFEST_NAME, load_bundle

    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["correction"] = section
    manifest["schema_version"] = max(int(manifest["schema_version"]), CORRECTION_SCHEMA_VERSION)
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    load_bundle(bundle, verify=False)


def tune(work: Path, llm: str = "default", bundle: Path | None = None) -> dict[str, Any]:
    """Three stages on the validation sets: the gap rule and the ranking weights
    (:data:`TUNE_AXES`), the best by :func:`_tune_key`; then the LLM's margin and weight
    (:data:`TUNE_LLM_AXES`): the fewest LLM calls within :data:`TUNE_LLM_TOLERANCE` words of
    the best; then ``unknown_margin`` (:data:`TUNE_UNKNOWN_MARGINS`). Writes the result as a
    bundle's ``correction`` section with its provenance (``correction.json``; into
    ``bundle``'s manifest when given)."""
    base = make_corrector(llm, "rescore", "default", {"cache_size": 0, "time_budget_s": None})
    memo = MemoBackend(base.backend)
    rows = []
    for rule in TUNE_GAP_RULES:
        words, meta = load_words(work, **rule)
        for values in itertools.product(*TUNE_AXES.values()):
            settings = {**TUNE_FIXED, **dict(zip(TUNE_AXES, values, strict=True))}
            rows.append(_tune_row(base, memo, words, meta["charset"], rule, settings))
    first = max(rows, key=_tune_key)
    words, meta = load_words(work, **first["gap_rule"])
    second = []
    for values in itertools.product(*TUNE_LLM_AXES.values()):
        settings = {**first["settings"], **dict(zip(TUNE_LLM_AXES, values, strict=True))}
        second.append(_tune_row(base, memo, words, meta["charset"], first["gap_rule"], settings))
    top = max(second, key=_tune_key)
    close = [r for r in second
             if _tune_key(r)[0] == _tune_key(top)[0] and r["total"] >= top["total"] - TUNE_LLM_TOLERANCE]
    chosen = min(close, key=lambda r: (_real_calls(r), -r["total"]))
    third = [_tune_row(base, memo, words, meta["charset"], first["gap_rule"],
                       {**chosen["settings"], "unknown_margin": m}) for m in TUNE_UNKNOWN_MARGINS]
    best = max(third, key=lambda r: (*_tune_key(r)[:2], r["settings"]["unknown_margin"]))
    (work / "tuned.json").write_text(json.dumps({"best": best, "first": first, "grid": rows, "llm_grid": second,
                                                 "unknown_grid": third}, indent=1))
    section = correction_section(best["settings"], best["gap_rule"], provenance(work, llm))
    (work / "correction.json").write_text(json.dumps(section, indent=1) + "\n")
    if bundle is not None:
        write_section(bundle, section)
    print(json.dumps(best))
    print(f"the bundle's correction section: {work / 'correction.json'}"
          + (f" (written into {bundle / 'manifest.json'})" if bundle is not None else
             " (--bundle DIR writes it into a bundle's manifest; --correction-config FILE uses it for a run)"),
          file=sys.stderr)
    return best


def sweep(work: Path, llm: str = "default") -> list[dict[str, Any]]:
    """Gate rate, changed, fixed and broken per set for thresholds 0.5 .. 0.95 (default settings)."""
    words, meta = load_words(work)
    base = make_corrector(llm, "rescore", "default", {"cache_size": 0, "time_budget_s": None})
    memo = MemoBackend(base.backend)
    rows = []
    for threshold in THRESHOLDS:
        corrector = base.with_settings(threshold=threshold)
        corrector.backend = memo
        row = {"threshold": threshold}
        for name in (*VAL_SETS, *TEST_SETS, *OCC_SETS):
            row[name] = evaluate(corrector, words[name], meta["charset"])
        row["val_gain"] = sum(row[n]["fixed"] - row[n]["broken"] for n in VAL_SETS)
        rows.append(row)
        print(f"threshold {threshold}: validation fixed - broken {row['val_gain']}", file=sys.stderr)
    (work / "sweep.json").write_text(json.dumps(rows, indent=1))
    header = ["threshold", *[f"{n} gate % / changed / fixed / broken" for n in (*VAL_SETS, *TEST_SETS, *OCC_SETS)],
              "validation fixed - broken"]
    table_rows = [[r["threshold"], *[f"{fmt(r[n]['gate_rate'])} / {r[n]['changed']} / {r[n]['fixed']} / "
                                     f"{r[n]['broken']}" for n in (*VAL_SETS, *TEST_SETS, *OCC_SETS)], r["val_gain"]]
                  for r in rows]
    print(markdown_table(header, table_rows))
    return rows


def table(work: Path, llm: str = "default", sets: Sequence[str] | None = None) -> dict[str, Any]:
    """Per set: accuracy without LLM and with each variant, gate rate, changed/fixed/broken, LLM ms.

    The LLM runs for real here (no memo, no cache), so its times are measured ones.
    """
    words, meta = load_words(work)
    names = list(sets or (*TEST_SETS, *OCC_SETS))
    out: dict[str, Any] = {"machine": machine(), "sets": {}}
    for column, model, mode, lexicon, settings in VARIANTS:
        corrector = make_corrector(model or llm, mode, lexicon, {"cache_size": 0, **settings})
        for name in names:
            result = evaluate(corrector, words[name], meta["charset"])
            out["sets"].setdefault(name, {})[column] = result
            print(f"{name} {column}: {json.dumps(result)}", file=sys.stderr)
    (work / "table.json").write_text(json.dumps(out, indent=1))
    header = ["set", "n", "no LLM %", *[f"{c} %" for c, *_ in VARIANTS],
              *[f"{c}: gate % / changed / fixed / broken / LLM ms median, p95" for c, *_ in VARIANTS]]
    rows = []
    for name in names:
        r = out["sets"][name]
        first = r[VARIANTS[0][0]]
        rows.append([name, first["n"], fmt(first["vision"]), *[fmt(r[c]["accuracy"]) for c, *_ in VARIANTS],
                     *[f"{fmt(r[c]['gate_rate'])} / {r[c]['changed']} / {r[c]['fixed']} / {r[c]['broken']} / "
                       f"{fmt(r[c]['llm_ms_median'])}, {fmt(r[c]['llm_ms_p95'])}" for c, *_ in VARIANTS]])
    print(machine_line(out["machine"]))
    print()
    print(markdown_table(header, rows))
    return out


def timing(llm: str = "default", engine: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """IC13-857 at batch 1: per crop the recognizer without LLM, then the corrector (default
    settings, no cache) on its prediction; LLM ms per gated word and the pipeline ratio."""
    from PIL import Image

    from runtime.charset import keep_for_eval
    from runtime.recognizer import Recognizer

    recognizer = Recognizer.from_bundle(engine, llm="none")
    corrector = make_corrector(llm, "rescore", "default", {"cache_size": 0})
    capture = Capture()
    recognizer.corrector = capture  # keeps the decoder's predictions, changes nothing
    captured = capture.predictions
    entries = [(p, label) for p, label in read_labels(TEST_SETS["ic13_857"]) if keep_for_eval(label)][:limit]
    pictures = []
    for path, _ in entries:
        with Image.open(path) as opened:
            pictures.append(opened.convert("RGB"))
    for picture in pictures[:3]:  # warm-up, untimed
        recognizer.read([picture], batch_size=1)
        corrector.correct_one(captured[0], recognizer.codec.charset)
    vision_ms, llm_ms, gated_ms = [], [], []
    for picture in pictures:
        t0 = time.perf_counter()
        recognizer.read([picture], batch_size=1)
        t1 = time.perf_counter()
        correction = corrector.correct_one(captured[0], recognizer.codec.charset)
        t2 = time.perf_counter()
        vision_ms.append(1000.0 * (t1 - t0))
        llm_ms.append(1000.0 * (t2 - t1))
        if correction.gated:
            gated_ms.append(1000.0 * (t2 - t1))
    recognizer.close()
    report = {"benchmark": "correction-timing", "machine": machine(), "crops": len(pictures),
              "gate_rate": 100.0 * len(gated_ms) / max(1, len(pictures)),
              "vision_ms_median": statistics.median(vision_ms), "vision_ms_total": sum(vision_ms),
              "llm_ms_per_gated_median": statistics.median(gated_ms) if gated_ms else 0.0,
              "llm_ms_per_gated_p95": percentile(gated_ms, 95) if gated_ms else 0.0,
              "llm_ms_total": sum(llm_ms),
              "pipeline_ratio": (sum(vision_ms) + sum(llm_ms)) / max(1e-9, sum(vision_ms)),
              "settings": corrector.describe()["settings"]}
    print(machine_line(report["machine"]))
    print(f"IC13-857, {len(pictures)} crops at batch 1: gate rate {report['gate_rate']:.1f}%, "
          f"LLM ms per gated word median {report['llm_ms_per_gated_median']:.1f}, "
          f"p95 {report['llm_ms_per_gated_p95']:.1f}; vision {report['vision_ms_median']:.1f} ms/crop (median); "
          f"pipeline with LLM / without: {report['pipeline_ratio']:.3f}x")
    print(json.dumps(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.correction", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("all", "prepare", "predict", "widths", "gaps", "tune", "learn", "sweep",
                                         "table", "timing"))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "correction")
    parser.add_argument("--sets", nargs="+", help="predict, table: only these sets")
    parser.add_argument("--limit", type=int, help="timing: only the first N crops")
    parser.add_argument("--engine", help="bundle (default: the embedded default)")
    parser.add_argument("--bundle", type=Path, help="tune, learn: write the correction section into this bundle "
                                                    "(learn: only when the learnt ranking wins)")
    parser.add_argument("--llm", default="default", help="GGUF: default or a path")
    args = parser.parse_args(argv)
    if args.step in ("all", "prepare"):
        prepare(args.work)
    if args.step in ("all", "predict"):
        predict(args.work, args.sets, args.engine)
    if args.step in ("all", "widths") and char_widths.main(["--work", str(args.work)]):
        return 1
    if args.step in ("all", "gaps"):
        gap_report(args.work)
    if args.step in ("all", "tune"):
        tune(args.work, args.llm, args.bundle)
    if args.step in ("all", "learn"):
        from benchmarks.ranking import learn

        learn(args.work, args.llm, args.bundle)
    if args.step in ("all", "sweep"):
        sweep(args.work, args.llm)
    if args.step in ("all", "table"):
        table(args.work, args.llm, args.sets)
    if args.step in ("all", "timing"):
        timing(args.llm, args.engine, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
