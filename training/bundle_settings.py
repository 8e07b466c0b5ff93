"""The runtime settings of a fine-tune's bundle, chosen by reading VAL and the keep sets with
the runtime itself (``--llm none``, one thread): the decode mode, and whether doubtful crops
are read again under extra views; then what the bundle and the one it started from read on VAL.

Torch-free: the bundle is exported already. Every set is read once per decode mode with one
view, and once more with the views of the bundle the fine-tune started from (fitted there on
thousands of crops; ``export.views``): those are kept when no set reads worse with them. A
fine-tune's VAL is small (a few hundred crops), where fitting the views anew gained a word or
two at the cost of five readings of every set (docs/finetune.md); ``fit=True`` still does that.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from export.manifest import read_manifest, write_manifest
from runtime.charset import keep_for_eval
from runtime.views import MANIFEST_KEY, ViewSettings
from training.specialist_fit import accuracy, rights

#: labelled crops: (image, label) pairs
Pairs = Sequence[tuple[Any, str]]
#: the decode modes tried, in the order ties go
DECODE_ORDER = ("cascade", "ctc", "full")
#: the validation set's name among the sets read (the keep sets are ``keep:NAME``)
VAL_NAME = "val"
#: the most crops of each keep set these choices read (a seeded sample of larger sets): they choose
#: a decode mode and views, not what the tower keeps; the keep rule of the mixes reads every crop
KEEP_SAMPLE = 500


def counted(pairs: Pairs) -> list[tuple[Any, str]]:
    """The pairs the evaluation protocol counts."""
    return [(x, y) for x, y in pairs if keep_for_eval(y)]


def sampled(pairs: Pairs, limit: int = KEEP_SAMPLE, seed: int = 0) -> list[tuple[Any, str]]:
    """``pairs``, or a seeded sample of ``limit`` of them in their order when there are more."""
    if len(pairs) <= limit:
        return list(pairs)
    return [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), limit))]


def runtime_texts(bundle: Path | None, sets: Mapping[str, Pairs], decode: str | None = None,
                  views: str | ViewSettings | None = None) -> dict[str, list[str]]:
    """Each set's texts (of its :func:`counted` crops) as the runtime's recognizer reads them
    with ``bundle`` (None: the embedded default; ``--llm none``, one thread; ``decode`` and
    ``views`` None: the bundle's own)."""
    from runtime.recognizer import Recognizer

    with Recognizer.from_bundle(bundle, llm="none", threads=1, decode=decode, views=views) as recognizer:
        return {name: [r.text or "" for r in recognizer.read([x for x, _ in counted(pairs)])]
                for name, pairs in sets.items()}


def labels_of(sets: Mapping[str, Pairs]) -> dict[str, list[str]]:
    """Each set's counted labels, in the order :func:`runtime_texts` reads them."""
    return {name: [y for _, y in counted(pairs)] for name, pairs in sets.items()}


def choose_decode(bundle: Path, sets: Mapping[str, Pairs]) -> tuple[str, dict[str, Any], dict[str, list[str]]]:
    """The decode mode the bundle reads best with, one view (the mean of its accuracy on
    :data:`VAL_NAME` and on every other set's crops together; ties in :data:`DECODE_ORDER`),
    written into its manifest's ``defaults.decode``: the decoders were trained on the original
    tower's features, so whether they still help is measured. The mode, every mode's figures
    (``val``, ``keep``) and the chosen mode's texts."""
    labels = labels_of(sets)
    keep_labels = [y for name, ys in labels.items() if name != VAL_NAME for y in ys]
    texts, scores = {}, {}
    for mode in DECODE_ORDER:
        texts[mode] = runtime_texts(bundle, sets, decode=mode, views="off")
        keep_texts = [t for name, ts in texts[mode].items() if name != VAL_NAME for t in ts]
        scores[mode] = {"val": accuracy(texts[mode][VAL_NAME], labels[VAL_NAME]),
                        "keep": accuracy(keep_texts, keep_labels) if keep_labels else 0.0}
    mode = max(DECODE_ORDER, key=lambda m: (scores[m]["val"] + scores[m]["keep"], -DECODE_ORDER.index(m)))
    manifest = read_manifest(bundle)
    manifest.setdefault("defaults", {})["decode"] = mode
    write_manifest(bundle, manifest)
    return mode, scores, texts[mode]


def source_views(source: Path | None) -> ViewSettings | None:
    """The view settings of the bundle a fine-tune started from (None: the embedded default's;
    a checkpoint without a manifest has none)."""
    if source is None:
        from runtime.bundle import DEFAULT_BUNDLE

        source = DEFAULT_BUNDLE
    if not (Path(source) / "manifest.json").is_file():
        return None
    return ViewSettings.from_manifest(read_manifest(source))


def view_figures(one_view: Mapping[str, Sequence[str]], with_views: Mapping[str, Sequence[str]],
                 labels: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """Per set: its crops, and the words the views fix and break against one view."""
    out = {}
    for name, truths in labels.items():
        before, after = rights(one_view[name], truths), rights(with_views[name], truths)
        out[name] = {"n": len(truths), "fixed": sum(a and not b for b, a in zip(before, after)),
                     "broken": sum(b and not a for b, a in zip(before, after))}
    return out


def keep_views(bundle: Path, settings: ViewSettings | None, sets: Mapping[str, Pairs],
               one_view: Mapping[str, Sequence[str]], source: Path | None,
               ) -> tuple[dict | None, dict[str, list[str]], dict[str, dict[str, int]] | None]:
    """Read ``sets`` with the bundle's decode mode and ``settings`` (the source's views) and
    keep them in the manifest when no set reads worse than with one view (``one_view``: the
    texts in that mode), else remove the views. The settings kept (None: one view), the texts
    the bundle now reads, and each set's words fixed and broken by the views (None: not read)."""
    manifest = read_manifest(bundle)
    defaults = manifest.setdefault("defaults", {})
    figures = None
    if settings is not None:
        texts = runtime_texts(bundle, sets, views=settings)
        figures = view_figures(one_view, texts, labels_of(sets))
        if all(f["fixed"] >= f["broken"] for f in figures.values()):
            defaults[MANIFEST_KEY] = {**settings.to_dict(), "validation": list(sets), "precision": "auto",
                                      "gain": sum(f["fixed"] - f["broken"] for f in figures.values()),
                                      "sets": figures,
                                      "chosen_by": f"python -m training.finetune (the views of "
                                                   f"{source or 'the default'}, no set worse)",
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_manifest(bundle, manifest)
            return settings.to_dict(), texts, figures
    defaults.pop(MANIFEST_KEY, None)
    write_manifest(bundle, manifest)
    return None, {name: list(texts) for name, texts in one_view.items()}, figures


def fit_views_anew(bundle: Path, sets: Mapping[str, Pairs]) -> tuple[dict | None, dict[str, list[str]]]:
    """Fit the views on ``sets`` by ``export.views``' rule (most words gained, no set worse) and
    write them; the settings (None: one view) and the texts the bundle then reads on VAL."""
    from export.views import fit_views
    from runtime.inputs import Sample

    labelled = [(name, [Sample(f"{name}/{i}", x, y) for i, (x, y) in enumerate(counted(pairs))])
                for name, pairs in sets.items()]
    settings = fit_views(bundle, [s for s in labelled if s[1]], threads=1)
    return settings, runtime_texts(bundle, {VAL_NAME: sets[VAL_NAME]})


def settle_bundle(bundle: Path, source: Path | None, val: Pairs, keep: Mapping[str, Pairs],
                  fit: bool = False, tower_only: Sequence[str] = ()) -> dict[str, Any]:
    """Choose and write the bundle's decode mode and views (see the module doc); ``decode``,
    ``decode_scores``, ``views`` (None: one view; both read VAL and at most :data:`KEEP_SAMPLE`
    crops of each keep set), ``views_check`` (:func:`keep_views`' figures, None when not read),
    and the runtime's VAL accuracy with the
    bundle (``val_after``) and with ``source`` (``val_before``, each with its own settings).
    The keep sets named in ``tower_only`` (synthetic words, which check what the tower forgets)
    choose the decode mode but not the views, which were fitted on real crops."""
    sets = {VAL_NAME: val, **{f"keep:{name}": sampled(pairs) for name, pairs in keep.items()}}
    mode, scores, one_view = choose_decode(bundle, sets)
    real = {name: pairs for name, pairs in sets.items() if name.removeprefix("keep:") not in tower_only}
    figures = None
    if fit:
        views, texts = fit_views_anew(bundle, real)
    else:
        views, texts, figures = keep_views(bundle, source_views(source), real,
                                           {name: one_view[name] for name in real}, source)
    val_labels = labels_of({VAL_NAME: val})[VAL_NAME]
    before = runtime_texts(source, {VAL_NAME: val})[VAL_NAME]
    return {"decode": mode, "decode_scores": scores, "views": views, "views_check": figures,
            "val_after": accuracy(texts[VAL_NAME], val_labels), "val_before": accuracy(before, val_labels)}
