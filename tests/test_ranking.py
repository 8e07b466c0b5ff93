"""The learnt ranking (benchmarks.ranking): logistic regression over candidate pairs of the named terms."""

from __future__ import annotations

import numpy as np

from benchmarks.ranking import FEATURES, as_settings, fit


def _pairs(rng: np.random.Generator, shift: np.ndarray, bias: float, words: int = 300) -> list:
    """Per word, pairs against the read word whose label follows shift . d + bias (plus noise)."""
    out = []
    for _ in range(words):
        d = rng.normal(0, 1, (4, len(FEATURES)))
        rows = np.hstack([d, np.ones((4, 1))])
        labels = ((d @ shift + bias + rng.normal(0, 0.3, 4)) > 0).astype(float)
        out.append((rows, labels))
    return out


def test_fit_recovers_the_direction_and_the_margin() -> None:
    rng = np.random.default_rng(0)
    shift = np.array([2.0, 0.0, 1.0, 0.0, 0.5])
    theta = fit(_pairs(rng, shift, bias=-2.0))
    scaled = theta / theta[0]
    assert abs(scaled[1]) < 0.1 and abs(scaled[2] - 0.5) < 0.1 and abs(scaled[4] - 0.25) < 0.1
    learnt = as_settings(theta)
    assert learnt["weights"]["visual"] == 1.0 and min(learnt["weights"].values()) >= 0
    assert 0.7 < learnt["margins"]["keep"] < 1.4  # -bias / visual weight, in nats (L2 shrinks the weights)


def test_flipped_labels_flip_the_weights() -> None:
    rng = np.random.default_rng(1)
    pairs = _pairs(rng, np.array([1.0, 0, 0, 0, 0]), bias=0.0)
    assert fit(pairs)[0] > 0 > fit([(rows, 1.0 - labels) for rows, labels in pairs])[0]
