"""A ranking learnt from the named score terms, against the hand-tuned weights (step 5 of issue 24).

    python -m benchmarks.correction learn [--work DIR] [--bundle DIR]

On the validation sets the ``tune`` step uses (never IC13, SVT or misc_real), every reviewed
word's candidates are collected with the hand-tuned settings, each with its terms
(:class:`runtime.correction.score.ScoreTerms`). A logistic regression over candidate pairs
of one word (:func:`word_pairs`; P = sigmoid(theta . (x_a - x_b) + bias), each word weighing
the same, L2-regularised, numpy only) gives a weight per
cheap term (visual, gap, insertion, symbol, prior) and, from the pairs against the word
read, a bias: scaled so the visual weight is 1, the weights and the keep margin (-bias, in
nats) replace the hand-tuned ones in the same rule (the LLM's weight and the other margins
unchanged). Both are scored on each validation set (fixed /
broken), in-sample and two-fold (fitted on every other word, scored on the rest). The learnt
weights are written as a bundle's correction section only when they win: more words gained
in total, in-sample and two-fold, and more fixed than broken on each real validation set.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.charset import eval_normalize

#: The terms the learnt ranking weighs (the decoder-scoring charge and the LLM's stay hand-set).
FEATURES = ("visual", "gap", "insertion", "symbol", "prior")
#: L2 penalty of the logistic regression (per word, on the standardised terms)
L2 = 1e-2


def word_pairs(corrector: Any, words: Sequence[Any], charset: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per reviewed word: its candidate pairs as (rows, labels). A row is the term difference
    of two candidates plus a last column that is 1 when the second is the word read (the
    keep-or-replace decision, whose learnt bias is the keep margin) and 0 otherwise. Pairs:
    each candidate against the word read (label 1: it should replace it, right against a
    wrong read word; 0: it should not, wrong against a right one) and, when the read word is
    wrong, the right candidate against each wrong one (label 1)."""
    out = []
    for index, word in enumerate(words):
        correction = corrector.correct_one(word.prediction, charset)
        scored = [c for c in correction.candidates if c.terms is not None]
        read = next((i for i, c in enumerate(scored) if c.text == word.prediction.text), None)
        if not correction.gated or len(scored) < 2 or read is None:
            continue
        truth = eval_normalize(word.label)
        x = np.array([[float(getattr(c.terms, f)) for f in FEATURES] for c in scored])
        right = np.array([eval_normalize(c.text) == truth for c in scored])
        rows, labels = [], []
        for i in range(len(scored)):
            if i != read and right[i] != right[read]:
                rows.append([*(x[i] - x[read]), 1.0])
                labels.append(float(right[i]))
        if not right[read]:
            for i in np.flatnonzero(right):
                for j in np.flatnonzero(~right):
                    if j != read:
                        rows.append([*(x[i] - x[j]), 0.0])
                        labels.append(1.0)
        if rows:
            out.append((index, np.array(rows), np.array(labels)))
    return out


def fit(pairs: Sequence[tuple[np.ndarray, np.ndarray]], l2: float = L2, steps: int = 100) -> np.ndarray:
    """Logistic regression P(label) = sigmoid(theta . row), each word weighing the same
    (its pairs share weight 1), ``l2`` x words x |theta|^2 on the standardised features,
    by Newton's method; theta in the raw features' units (the last entry: the bias of the
    pairs against the word read)."""
    d = np.concatenate([rows for rows, _ in pairs])
    y = np.concatenate([labels for _, labels in pairs])
    w = np.concatenate([np.full(len(labels), 1.0 / len(labels)) for _, labels in pairs])
    scale = d.std(axis=0)
    scale[scale == 0] = 1.0
    scale[-1] = 1.0
    z = d / scale
    penalty = 2 * l2 * len(pairs) * np.diag([1.0] * (d.shape[1] - 1) + [0.0])
    theta = np.zeros(d.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ theta, -50, 50)))
        grad = (w * (y - p)) @ z - penalty @ theta
        hess = -(z * (w * p * (1 - p))[:, None]).T @ z - penalty
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.abs(step).max() < 1e-9:
            break
    return theta / scale


def as_settings(theta: np.ndarray) -> dict[str, dict[str, float]]:
    """The learnt weights and keep margin in the settings' fields: scaled so the visual weight
    is 1 (margins in nats), the credits and the prior clipped at 0 (the settings' domain),
    the keep margin = -bias (at least 0)."""
    scaled = theta / theta[0] if theta[0] > 0 else theta
    weights = {f: round(max(0.0, float(v)), 4) for f, v in zip(FEATURES, scaled[: len(FEATURES)], strict=True)}
    return {"weights": weights, "margins": {"keep": round(max(0.0, float(-scaled[-1])), 4)}}


def learn(work: Path, llm: str = "default", bundle: Path | None = None) -> dict[str, Any]:
    """Fit, score hand-tuned against learnt per validation set, write ``learned.json`` (and the
    section into ``bundle`` when the learnt weights win)."""
    from benchmarks.correction import (
        REAL_VAL,
        VAL_SETS,
        MemoBackend,
        correction_section,
        evaluate,
        load_words,
        make_corrector,
        provenance,
        write_section,
    )
    from runtime.correction.settings import CorrectionSettings

    words, meta = load_words(work)
    charset = meta["charset"]
    base = make_corrector(llm, "rescore", "default", {"cache_size": 0, "time_budget_s": None})
    memo = MemoBackend(base.backend)
    base.backend = memo
    hand = base.settings

    def corrector(learnt: dict[str, dict[str, float]] | None) -> Any:
        settings = hand if learnt is None else hand.merged(learnt)
        c = base.with_settings(settings)
        c.backend = memo
        return c

    def scores(c: Any, part: dict[str, list]) -> dict[str, dict[str, int]]:
        return {name: {k: evaluate(c, part[name], charset)[k] for k in ("fixed", "broken", "gated", "llm_calls")}
                for name in VAL_SETS}

    pairs = {name: word_pairs(base, words[name], charset) for name in VAL_SETS}
    theta = fit([(rows, labels) for name in VAL_SETS for _, rows, labels in pairs[name]])
    learnt = as_settings(theta)
    print(f"learnt {learnt} (raw {theta.round(4).tolist()})", file=sys.stderr)
    report: dict[str, Any] = {"features": FEATURES, "hand": {"weights": {f: getattr(hand.weights, f) for f in FEATURES},
                                                             "margins": {"keep": hand.margins.keep}},
                              "learnt": learnt, "theta": theta.tolist(),
                              "pairs": {n: int(sum(len(p[2]) for p in pairs[n])) for n in VAL_SETS},
                              "words_with_pairs": {n: len(pairs[n]) for n in VAL_SETS}}
    hand_scores = scores(corrector(None), words)
    report["in_sample"] = {"hand": hand_scores, "learnt": scores(corrector(learnt), words)}
    # two folds: every other word of each set; the hand-tuned weights learn nothing, so their
    # two-fold score is their in-sample one
    two_fold: dict[str, Any] = {"hand": hand_scores, "learnt": {}, "weights": []}
    for k in (0, 1):
        train = [(rows, labels) for n in VAL_SETS for i, rows, labels in pairs[n] if i % 2 == k]
        fold_settings = as_settings(fit(train))
        two_fold["weights"].append(fold_settings)
        test = {n: ws[1 - k::2] for n, ws in words.items()}
        for name, row in scores(corrector(fold_settings), test).items():
            total = two_fold["learnt"].setdefault(name, {"fixed": 0, "broken": 0, "gated": 0, "llm_calls": 0})
            for key, value in row.items():
                total[key] += value
    report["two_fold"] = two_fold

    def gain(rows: dict[str, dict[str, int]]) -> int:
        return sum(r["fixed"] - r["broken"] for r in rows.values())

    wins = all(gain(report[part]["learnt"]) > gain(report[part]["hand"]) for part in ("in_sample", "two_fold"))
    safe = all(report["in_sample"]["learnt"][n]["fixed"] > report["in_sample"]["learnt"][n]["broken"]
               for n in REAL_VAL)
    report["gain"] = {part: {who: gain(report[part][who]) for who in ("hand", "learnt")}
                      for part in ("in_sample", "two_fold")}
    report["ships"] = bool(wins and safe)
    if report["ships"]:
        settings = hand.merged(learnt)
        flat = {"gap_credit": settings.weights.gap, "insert_credit": settings.weights.insertion,
                "symbol_credit": settings.weights.symbol, "prior_weight": settings.weights.prior,
                "keep_margin": settings.margins.keep}
        origin = {**provenance(work, llm), "tool": "python -m benchmarks.correction learn"}
        section = correction_section(flat, {}, origin)
        section["weights"]["visual"] = settings.weights.visual
        (work / "correction.learned.json").write_text(json.dumps(section, indent=1) + "\n")
        if bundle is not None:
            write_section(bundle, section)
    assert isinstance(CorrectionSettings.from_dict(learnt), CorrectionSettings)
    (work / "learned.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report
