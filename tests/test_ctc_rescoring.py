"""Joint CTC/attention rescoring (``runtime.decoding``): the CTC forward algorithm, the
choice between the decoder's word and the tower's CTC reading, and the bundles that use it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.decoding import (
    CharCodec,
    ctc_greedy,
    ctc_log_likelihood,
    ctc_rescored,
    joint_score,
    positional_log_likelihood,
    softmax,
)

CODEC = CharCodec("36")


def _decoder_probs(text: str, steps: int = 8, sure: float = 8.0) -> np.ndarray:
    """Per-position distributions that read ``text`` then EOS."""
    logits = np.zeros((steps, CODEC.num_classes), dtype=np.float32)
    for position, token in enumerate([*CODEC.ids(text), CODEC.eos_id][:steps]):
        logits[position, token] = sure
    return softmax(logits)


def _ctc_log_probs(frames: list[str], sure: float = 8.0) -> np.ndarray:
    """CTC outputs: one frame per entry, a character or "" for the blank."""
    logits = np.zeros((len(frames), CODEC.num_classes), dtype=np.float32)
    for t, char in enumerate(frames):
        logits[t, CODEC.ids(char)[0] if char else 0] = sure
    return np.log(softmax(logits))


def test_ctc_likelihood_equals_torch_ctc_loss() -> None:
    torch = pytest.importorskip("torch", reason="torch's ctc_loss is the reference (train extra)")
    rng = np.random.default_rng(0)
    for case in range(200):
        frames, length = int(rng.integers(1, 16)), int(rng.integers(0, 9))
        log_probs = torch.randn(frames, 7, generator=torch.Generator().manual_seed(case)).log_softmax(-1)
        ids = rng.integers(1, 7, length)
        if length > 1 and case % 3 == 0:
            ids[1] = ids[0]  # a repeat needs a blank between its two frames
        loss = torch.nn.functional.ctc_loss(log_probs[:, None], torch.from_numpy(ids)[None].long(),
                                            torch.tensor([frames]), torch.tensor([length]), blank=0,
                                            reduction="sum").item()
        got = ctc_log_likelihood(log_probs.numpy(), ids)
        if np.isinf(loss):  # the word cannot fit in the frames
            assert got == -np.inf
        else:
            assert got == pytest.approx(-loss, abs=1e-4)


def test_greedy_merges_repeats_and_drops_blanks() -> None:
    assert CODEC.ids_to_text(ctc_greedy(_ctc_log_probs(["h", "h", "", "e", "l", "", "l", "o", ""]))[None]) == ["hello"]
    assert len(ctc_greedy(_ctc_log_probs(["", ""]))) == 0


def test_positional_likelihood_counts_the_end_of_word() -> None:
    probs = _decoder_probs("bar")
    assert positional_log_likelihood(probs, CODEC.ids("bar")) > positional_log_likelihood(probs, CODEC.ids("ba"))
    assert positional_log_likelihood(probs, CODEC.ids("bar")) > positional_log_likelihood(probs, CODEC.ids("bars"))


def test_rescoring_takes_the_ctc_reading_only_when_it_scores_higher() -> None:
    # the decoder adds a character the CTC frames do not show, and is unsure of it
    unsure = _decoder_probs("radios")
    unsure[5] = softmax(np.where(np.arange(CODEC.num_classes) == CODEC.ids("s")[0], 1.0, 0.0).astype(np.float32))
    frames = _ctc_log_probs(["r", "", "a", "d", "", "i", "o", "", ""])
    (prediction,) = ctc_rescored(CODEC, unsure[None], frames[None], topk=3)
    assert prediction.text == "radio"
    assert len(prediction.char_probs) == len(prediction.topk) == 5
    # with the decoder's term weighted in, a decoder sure of its word keeps it against a
    # weak CTC reading; the default weights (the CTC likelihood alone) take the CTC word
    weak = _ctc_log_probs(["r", "", "a", "d", "", "i", "o", "", ""], sure=1.0)
    sure = _decoder_probs("radios")
    (kept,) = ctc_rescored(CODEC, sure[None], weak[None], decoder_weight=1.0)
    assert kept.text == "radios"
    assert joint_score(sure, weak, CODEC.ids("radios"), decoder_weight=1.0) > joint_score(
        sure, weak, CODEC.ids("radio"), decoder_weight=1.0)
    (default,) = ctc_rescored(CODEC, sure[None], weak[None])
    assert default.text == "radio"
    # the decoder's word wins when the CTC frames themselves favour it over their best path
    frames = _ctc_log_probs(["r", "", "a", "d", "", "i", "o", "", "s"], sure=8.0)
    frames[-1] = np.log(softmax(np.where(np.arange(CODEC.num_classes) == CODEC.ids("s")[0], 0.2, 0.0)
                                .astype(np.float32) + np.where(np.arange(CODEC.num_classes) == 0, 0.1, 0.0)))
    assert ctc_rescored(CODEC, sure[None], frames[None])[0].text in {"radio", "radios"}


def test_rescoring_never_picks_an_empty_ctc_reading_and_matches_plain_decoding_when_they_agree() -> None:
    probs = np.stack([_decoder_probs("exit"), _decoder_probs("open")])
    blanks = _ctc_log_probs(["", "", "", "", ""])
    agree = _ctc_log_probs(["o", "p", "", "e", "n"])
    got = ctc_rescored(CODEC, probs, np.stack([blanks, agree]), topk=2)
    assert got == CODEC.decode(probs, topk=2)


def test_bundle_with_rescoring_needs_the_ctc_output(tmp_path: Path) -> None:
    from runtime.bundle import DEFAULT_BUNDLE, BundleError, load_bundle

    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    assert manifest["decode"]["ctc_rescoring"] is True
    assert load_bundle(DEFAULT_BUNDLE).decode.ctc_rescoring
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    for graphs in manifest["graphs"].values():
        outputs = graphs["image_encoder"]["outputs"]
        graphs["image_encoder"]["outputs"] = [o for o in outputs if o["name"] != "ctc_log_probs"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ctc_log_probs"):
        load_bundle(copy)
