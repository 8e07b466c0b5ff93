"""Where a character is missing (``runtime.decoding``): the CTC forced alignment of a word,
its characters' frame centres and the gaps between them that an occluder leaves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime.decoding import (
    CharCodec,
    Gap,
    best_path_alignment,
    character_centres,
    character_pitch,
    ctc_alignment,
    ctc_greedy,
    ctc_rescored,
    find_gaps,
    softmax,
)

CODEC = CharCodec("36")


def _decoder_probs(text: str, steps: int = 12) -> np.ndarray:
    logits = np.zeros((steps, CODEC.num_classes), dtype=np.float32)
    for position, token in enumerate([*CODEC.ids(text), CODEC.eos_id][:steps]):
        logits[position, token] = 8.0
    return softmax(logits)


def _frames(layout: str) -> np.ndarray:
    """CTC log-probabilities from a layout string: one frame per character, "." a blank."""
    logits = np.zeros((len(layout), CODEC.num_classes), dtype=np.float32)
    for t, char in enumerate(layout):
        logits[t, 0 if char == "." else CODEC.ids(char)[0]] = 8.0
    return np.log(softmax(logits))


def _collapse(path: tuple[int, ...]) -> list[int]:
    out, previous = [], None
    for label in path:
        if label != 0 and label != previous:
            out.append(label)
        previous = label
    return out


@pytest.mark.parametrize("seed", range(3))
def test_forced_alignment_is_the_best_path_of_the_word_by_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = 3
    for _ in range(80):
        frames = int(rng.integers(1, 6))
        log_probs = np.log(rng.dirichlet(np.ones(classes + 1), size=frames))
        ids = rng.integers(1, classes + 1, size=int(rng.integers(0, 4)))
        best, best_path = -np.inf, None
        for path in itertools.product(range(classes + 1), repeat=frames):
            if _collapse(path) == list(ids):
                score = log_probs[np.arange(frames), path].sum()
                if score > best:
                    best, best_path = score, path
        alignment = ctc_alignment(log_probs, ids)
        if best_path is None:  # the word cannot fit (e.g. "aa" needs a blank between)
            assert alignment is None
            continue
        labels = [0 if a < 0 else int(ids[a]) for a in alignment]
        assert _collapse(tuple(labels)) == list(ids)
        assert np.isclose(log_probs[np.arange(frames), labels].sum(), best)
        # each character's frames are one run, in order
        for j in range(len(ids)):
            where = np.flatnonzero(alignment == j)
            assert len(where) and np.all(np.diff(where) == 1)


def test_best_path_alignment_matches_the_forced_alignment_of_the_greedy_word() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        log_probs = np.log(rng.dirichlet(np.ones(6) * 0.3, size=int(rng.integers(1, 30))))
        greedy = ctc_greedy(log_probs)
        assert np.array_equal(best_path_alignment(log_probs), ctc_alignment(log_probs, greedy))


def test_a_long_blank_run_is_a_gap_at_the_right_slot() -> None:
    # "rescue" with the "c" covered: the decoder and the CTC frames both read "resue"
    frames = _frames("r..e..s........u..e......")
    (prediction,) = ctc_rescored(CODEC, _decoder_probs("resue")[None], frames[None], topk=3)
    assert prediction.text == "resue"
    assert prediction.char_frames == [0.0, 3.0, 6.0, 15.0, 18.0]
    assert [(g.slot, g.missing) for g in prediction.gaps] == [(3, 2)]  # 9 frames at a 3-frame pitch
    assert 2.5 < prediction.gaps[0].strength < 3.5  # 3 pitches, give or take the widths of "s" and "u"
    # one covered character: one missing
    (one,) = ctc_rescored(CODEC, _decoder_probs("resue")[None], _frames("r..e..s.....u..e......")[None])
    assert [(g.slot, g.missing) for g in one.gaps] == [(3, 1)]


def test_a_normal_word_has_no_gap() -> None:
    for layout, word in (("r..e..s..c..u..e....", "rescue"), ("h.o.u.s..e....", "house"), ("o..k......", "ok")):
        (prediction,) = ctc_rescored(CODEC, _decoder_probs(word)[None], _frames(layout)[None])
        assert prediction.text == word and len(prediction.char_frames) == len(word)
        assert prediction.gaps == []


def test_the_decoders_word_is_aligned_when_it_differs_from_the_ctc_reading() -> None:
    # the CTC frames show a stray mark in the occluded stretch; the decoder's word wins (with
    # the decoder's term weighted in) and is aligned to the frames by Viterbi
    frames = _frames("r..e..s....x...u..e......")
    frames[11] = np.log(softmax(np.where(np.arange(CODEC.num_classes) == CODEC.ids("x")[0], 0.6, 0.0)))
    (prediction,) = ctc_rescored(CODEC, _decoder_probs("resue")[None], frames[None], decoder_weight=1.0)
    assert prediction.text == "resue" and len(prediction.char_frames) == 5
    assert [g.slot for g in prediction.gaps] == [3]


def test_no_ctc_frames_no_gaps_and_the_prior_pitch_for_short_words() -> None:
    assert CODEC.decode(_decoder_probs("resue")[None])[0].gaps == []
    assert find_gaps([]) == [] and find_gaps([4.0]) == []
    # two characters: the word's own distance says nothing; the prior pitch (3 frames) does
    assert character_pitch([0.0, 9.0], prior=3.0, min_distances=3) == 3.0
    assert [g.slot for g in find_gaps([0.0, 9.0], ratio=1.7, prior=3.0)] == [1]
    assert find_gaps([0.0, 4.0], ratio=1.7, prior=3.0) == []
    # strongest first
    gaps = find_gaps([0.0, 3.0, 12.0, 15.0, 18.0, 24.0, 27.0], ratio=1.7)
    assert [g.slot for g in gaps] == [2, 5] and gaps[0] == Gap(2, 2, 3.0)


def test_character_centres() -> None:
    assert character_centres(np.array([0, 0, -1, 1, -1, -1, 2, 2, 2]), 3) == [0.5, 3.0, 7.0]


def test_character_widths_decide_what_counts_as_a_gap() -> None:
    from runtime.decoding import char_widths, pair_widths

    widths = char_widths()
    assert widths["m"] > widths["n"] > widths["i"] and widths["W"] > widths["I"]
    assert list(pair_widths("mg", 1)) == pytest.approx([(widths["m"] + widths["g"]) / 2])
    assert list(pair_widths(None, 2)) == [1.0, 1.0] and list(pair_widths("abc", 1)) == [1.0]
    # a wide "m" next to a "g": their centres sit far apart without anything between them
    assert find_gaps([0.0, 4.5], ratio=1.5, min_extra=1.5) != []
    assert find_gaps([0.0, 4.5], ratio=1.5, min_extra=1.5, text="mg") == []
    # two narrow letters as far apart are a gap only when the widths are known
    assert find_gaps([0.0, 4.2], ratio=1.5, min_extra=1.5) == []
    assert [g.slot for g in find_gaps([0.0, 4.2], ratio=1.5, min_extra=1.5, text="il")] == [1]
    # the pitch is per median-width character: "mmmm" evenly spaced has no gap and a wide pitch
    frames = [0.0, 4.9, 9.8, 14.7, 19.6]
    assert find_gaps(frames, text="mmmmm") == [] and character_pitch(frames, text="mmmmm") == pytest.approx(
        4.9 / widths["m"])


def test_fitted_widths_recover_the_widths_that_made_the_frames() -> None:
    from benchmarks.char_widths import fit

    truth = {"i": 0.6, "n": 1.0, "o": 1.05, "e": 1.0, "m": 1.7, "w": 1.5, "t": 0.8, "s": 0.95}
    rng = np.random.default_rng(0)
    words = []
    for _ in range(400):
        text = "".join(rng.choice(list(truth), size=int(rng.integers(3, 9))))
        pitch = rng.uniform(2.0, 5.0)
        steps = [pitch * (truth[a] + truth[b]) / 2 * rng.lognormal(0.0, 0.03) for a, b in zip(text, text[1:])]
        words.append((text, np.concatenate([[0.0], np.cumsum(steps)])))
    widths, spread = fit(words)
    scale = np.median(list(truth.values()))
    for c, w in truth.items():
        assert widths[c] == pytest.approx(w / scale, rel=0.03)
    assert spread < 0.05
