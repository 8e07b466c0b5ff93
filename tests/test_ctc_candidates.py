"""Candidates scored by the image tower's CTC likelihood (fake LLM, small lexicons)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from runtime.charset import CHARSET_94
from runtime.correction.lexicon import Lexicon
from runtime.decoding import Gap, Prediction, ctc_log_likelihood, ctc_log_likelihoods
from runtime.llm import Corrector, CorrectorSettings


def brute_force(log_probs: np.ndarray, ids: list[int]) -> float:
    """log P(ids) by summing over every path of the frames (blank 0)."""
    total = -math.inf
    frames, classes = log_probs.shape
    for path in itertools.product(range(classes), repeat=frames):
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        if collapsed == ids:
            total = np.logaddexp(total, sum(log_probs[t, c] for t, c in enumerate(path)))
    return float(total)


@pytest.mark.parametrize("seed", range(3))
def test_batched_likelihoods_equal_a_sum_over_every_path(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(5, 4))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    words = [[], [1], [2, 2], [1, 2, 3], [3, 3, 3], [1, 2, 1, 2], [1, 1, 1, 1, 1, 1]]
    got = ctc_log_likelihoods(log_probs, [np.array(w, dtype=np.int64) for w in words])
    for word, value in zip(words, got, strict=True):
        want = brute_force(log_probs, word)
        assert value == pytest.approx(want, abs=1e-9) or (math.isinf(want) and math.isinf(value))
        assert ctc_log_likelihood(log_probs, np.array(word, dtype=np.int64)) == pytest.approx(value, abs=1e-12)
    assert math.isinf(got[-1])  # six characters with repeats cannot fit in five frames


def ctc_frames(frames: list[dict[str, float]], charset: str = CHARSET_94) -> np.ndarray:
    """``(T, C+1)`` log-probabilities: per frame the given character probabilities, the rest
    on the blank (a little mass everywhere)."""
    out = np.full((len(frames), len(charset) + 1), 1e-6)
    for t, chars in enumerate(frames):
        for c, p in chars.items():
            out[t, charset.index(c) + 1] = p
        out[t, 0] = max(1e-6, 1.0 - sum(chars.values()))
    return np.log(out / out.sum(-1, keepdims=True))


class SilentLM:
    """An LLM with no preference (the test is about the visual term)."""

    name = "silent"

    def score(self, prefix, continuations, deadline=None):
        return [-10.0] * len(continuations)

    def fill(self, prompt, grammar, max_tokens, deadline=None):
        return ""


def corrector(words: dict[str, float], **settings: object) -> Corrector:
    config = {"visual": "ctc", "insert_at": "anywhere", "weight": 0.0, **settings}
    return Corrector(SilentLM(), CorrectorSettings(**config), lexicons=[Lexicon(list(words), list(words.values()))])


# "Resue": the covered "c" left three blank frames after "s" where the frames hint at "c";
# between "u" and "e" there is no room for a letter
RESUE = ctc_frames([{"R": 0.99}, {}, {"e": 0.99}, {}, {"s": 0.99}, {}, {"c": 0.05}, {}, {"u": 0.99}, {},
                    {"e": 0.99}, {}])


def test_the_frames_say_where_a_skipped_character_was() -> None:
    pred = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"], ctc_log_probs=RESUE)
    got = corrector({"rescue": -9.0, "resume": -9.0}, review_unknown=True).correct_one(pred, CHARSET_94)
    assert got.gated and got.unknown_word and got.text == "Rescue"
    visual = {c.text: c.visual_logprob for c in got.candidates}
    assert visual["Rescue"] > visual["Resume"] + 3  # same prior: the frames decide
    # without the CTC outputs the decoder's view cannot tell them apart: the lexicon order decides
    blind = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"])
    ranked = corrector({"rescue": -9.0, "resume": -9.0}, review_unknown=True).correct_one(blind, CHARSET_94)
    scores = {c.text: c.score for c in ranked.candidates}
    assert scores["Rescue"] == pytest.approx(scores["Resume"])


def test_a_ctc_gap_earns_its_credit() -> None:
    pred = Prediction("Resue", [0.99] * 5, [[(c, 0.99)] for c in "Resue"], ctc_log_probs=RESUE)
    words = {"rescue": -9.0}
    # a known word ("resue" in the list): only the gap's credit can make the insertion win
    known = {**words, "resue": -9.0}
    assert corrector(known, gap_credit=0.0, insert_credit=0.0).correct_one(pred, CHARSET_94).text == "Resue"
    with_gap = Prediction(pred.text, pred.char_probs, pred.topk, gaps=[Gap(3, 1, 2.0)], ctc_log_probs=RESUE)
    got = corrector(known, gap_credit=12.0, insert_credit=0.0).correct_one(with_gap, CHARSET_94)
    assert got.gated and got.gaps == [3] and got.text == "Rescue"


def test_keep_margin_keeps_the_read_word_on_a_near_tie() -> None:
    frames = ctc_frames([{"c": 0.99}, {}, {"o": 0.99}, {}, {"t": 0.5, "f": 0.45}, {}, {"f": 0.99}, {},
                         {"e": 0.99}, {}, {"e": 0.99}, {}])
    topk = [[(c, 0.99)] for c in "cotfee"]
    topk[2] = [("t", 0.5), ("f", 0.45)]
    probs = [0.99, 0.99, 0.5, 0.99, 0.99, 0.99]
    pred = Prediction("cotfee", probs, topk, ctc_log_probs=frames)
    words = {"coffee": -11.0, "cotfee": -12.1}  # the frames favour "t" by 0.1 nats, the prior "coffee" by 1.1
    assert corrector(words, keep_margin=0.0).correct_one(pred, CHARSET_94).text == "coffee"
    kept = corrector(words, keep_margin=2.0).correct_one(pred, CHARSET_94)
    assert kept.gated and kept.text == "cotfee" and kept.candidates[0].text == "coffee"


class PrefersCoffee(SilentLM):
    """An LLM that likes "coffee" one nat more than anything else."""

    def score(self, prefix, continuations, deadline=None):
        return [-10.0 if c.startswith("coffee") else -11.0 for c in continuations]


def test_unknown_margin_keeps_the_read_word_between_two_words_in_no_lexicon() -> None:
    frames = ctc_frames([{"c": 0.99}, {}, {"o": 0.99}, {}, {"t": 0.5, "f": 0.45}, {}, {"f": 0.99}, {},
                         {"e": 0.99}, {}, {"e": 0.99}, {}])
    topk = [[(c, 0.99)] for c in "cotfee"]
    topk[2] = [("t", 0.5), ("f", 0.45)]
    pred = Prediction("cotfee", [0.99, 0.99, 0.5, 0.99, 0.99, 0.99], topk, ctc_log_probs=frames)

    def run(words: dict[str, float], margin: float) -> str:
        settings = CorrectorSettings(visual="ctc", insert_at="anywhere", weight=1.0, keep_margin=0.0,
                                     unknown_margin=margin)
        c = Corrector(PrefersCoffee(), settings, lexicons=[Lexicon(list(words), list(words.values()))])
        return c.correct_one(pred, CHARSET_94).text

    # neither word is listed: the LLM's 1 nat against the frames' 0.1 is a near-tie
    assert run({"tea": -8.0}, 0.0) == "coffee"
    assert run({"tea": -8.0}, 1.0) == "cotfee"
    # a listed candidate is not held back by the margin for unknown words
    assert run({"tea": -8.0, "coffee": -11.0}, 1.0) == "coffee"
    with pytest.raises(ValueError, match="margins.unknown"):
        CorrectorSettings(unknown_margin=-1.0)


def test_trusted_characters_survive_ctc_scoring() -> None:
    from runtime.correction.gate import gate
    from runtime.llm import keeps_trusted

    rng = np.random.default_rng(7)
    letters = "abcdefgh"
    words = sorted({"".join(rng.choice(list(letters), size=int(rng.integers(2, 8)))) for _ in range(2000)})
    c = Corrector(SilentLM(), CorrectorSettings(visual="ctc", insert_at="anywhere", review_unknown=True,
                                                weight=0.5, llm_margin=1e9),
                  lexicons=[Lexicon(words, list(rng.uniform(-20, -3, size=len(words))))])
    for _ in range(100):
        text = "".join(rng.choice(list(letters), size=int(rng.integers(2, 7))))
        probs = [float(rng.choice([0.99, 0.95, 0.5])) for _ in text]
        topk = [[(ch, p), (str(rng.choice(list(letters))), (1 - p) / 2)] for ch, p in zip(text, probs, strict=True)]
        frames = ctc_frames([f for ch in text for f in ({ch: 0.9}, {str(rng.choice(list(letters))): 0.05})])
        got = c.correct_one(Prediction(text, probs, topk, ctc_log_probs=frames), CHARSET_94)
        assert set(got.text) <= set(CHARSET_94)
        assert keeps_trusted(got.text, gate(Prediction(text, probs, topk), 0.8), c.settings.candidates.inserts)


def test_a_gap_credits_only_the_characters_it_lost() -> None:
    frames = ctc_frames([{"F": 0.99}, {}, {}, {}, {}, {}, {"R": 0.99}, {}])
    pred = Prediction("FR", [0.99, 0.99], [[("F", 0.99)], [("R", 0.99)]], gaps=[Gap(1, 1, 2.0)],
                      ctc_log_probs=frames)
    got = corrector({"for": -9.0, "fair": -9.0}, gap_credit=14.0, insert_credit=0.0).correct_one(pred, CHARSET_94)
    assert got.text == "FOR"  # one lost character: the second insertion earns nothing
    visual = {c.text: c.visual_logprob for c in got.candidates}
    assert visual["FOR"] > visual["FAIR"] + 10
    two = Prediction("FR", pred.char_probs, pred.topk, gaps=[Gap(1, 2, 3.0)], ctc_log_probs=frames)
    assert corrector({"for": -9.0, "fair": -9.0}, gap_credit=14.0, insert_credit=0.0).correct_one(
        two, CHARSET_94).text == "FAIR"


def test_symbol_credit_lets_a_letter_replace_a_symbol_read_where_one_was_covered() -> None:
    frames = ctc_frames([{"d": 0.99}, {}, {"r": 0.99}, {}, {"_": 0.9}, {}, {"s": 0.99}, {}, {"s": 0.99}, {}])
    pred = Prediction("dr_ss", [0.99] * 5, [[(c, 0.99)] for c in "dr_ss"], ctc_log_probs=frames)
    words = {"dress": -9.0}
    kept = corrector(words, symbol_credit=0.0).correct_one(pred, CHARSET_94)
    assert kept.gated and kept.masked == [2] and kept.text == "dr_ss"
    assert corrector(words, symbol_credit=12.0).correct_one(pred, CHARSET_94).text == "dress"
