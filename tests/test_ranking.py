"""The learnt ranking (benchmarks.ranking): pairwise logistic regression over the named terms."""

from __future__ import annotations

import numpy as np

from benchmarks.ranking import FEATURES, as_weights, fit


def test_fit_finds_the_term_that_separates_right_from_wrong() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(200):  # per word: right - wrong; the right one has more visual evidence and a better prior
        d = rng.normal(0, 1, (3, len(FEATURES)))
        d[:, 0] += 2.0
        d[:, 4] += 1.0
        pairs.append(d)
    theta = fit(pairs)
    assert theta[0] > 0 and theta[4] > 0 and abs(theta[1]) < theta[0]
    weights = as_weights(theta)
    assert weights["visual"] == 1.0 and weights["prior"] > 0 and min(weights.values()) >= 0


def test_flipped_pairs_flip_the_weights() -> None:
    rng = np.random.default_rng(1)
    pairs = [rng.normal([1.0, 0, 0, 0, 0], 1.0, (4, len(FEATURES))) for _ in range(100)]
    assert fit(pairs)[0] > 0 > fit([-p for p in pairs])[0]
