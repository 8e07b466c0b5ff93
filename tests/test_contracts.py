"""The shared contracts: charset/protocol, token ids and decoding, preprocessing, BPE ids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.charset import (
    CHARSET_36,
    CHARSET_94,
    CharsetAdapter,
    WordAccuracy,
    eval_normalize,
    keep_for_eval,
    normalize_label,
    normalized_edit_distance,
    weighted_total,
)
from runtime.decoding import CharCodec, first_eos, softmax
from runtime.preprocess import Preprocessing, preprocess


def test_charsets_have_expected_sizes() -> None:
    assert len(CHARSET_94) == 94 and len(CHARSET_36) == 36


def test_normalize_label_removes_whitespace_accents_and_long_labels() -> None:
    assert normalize_label(" Caf\u00e9 au lait ") == "Cafeaulait"
    assert normalize_label("a" * 26) is None
    assert normalize_label("\u4e2d\u6587") is None  # nothing survives as ASCII
    assert normalize_label("Hello!", charset=CHARSET_36) == "hello"


def test_charset_adapter_case_rules() -> None:
    assert CharsetAdapter(CHARSET_36)("AbC-1") == "abc1"
    assert CharsetAdapter("ABC")("abcd") == "ABC"
    assert CharsetAdapter(CHARSET_94)("Ab c\u00e9") == "Abc"


def test_protocol_scores_case_and_punctuation_insensitively() -> None:
    assert eval_normalize("Hello, World!") == "helloworld"
    acc = WordAccuracy()
    acc.update(["HELLO", "wor1d", ""], ["hello", "world", "x"])
    assert acc.n == 3 and acc.correct == 1
    assert acc.accuracy == pytest.approx(100 / 3)
    assert normalized_edit_distance("wor1d", "world") == pytest.approx(0.2)
    assert keep_for_eval("a" * 25) and not keep_for_eval("a" * 26)
    total = weighted_total([{"n": 1, "accuracy": 100.0, "ned": 100.0}, {"n": 3, "accuracy": 0.0, "ned": 50.0}])
    assert total["accuracy"] == pytest.approx(25.0) and total["ned"] == pytest.approx(62.5)


def test_codec_ids_follow_design() -> None:
    codec = CharCodec(CHARSET_94)
    assert (codec.eos_id, codec.bos_id, codec.pad_id, codec.num_classes) == (0, 95, 96, 95)
    ids = codec.encode(["ab", "c"])
    a, b, c = (CHARSET_94.index(x) + 1 for x in "abc")
    assert ids.tolist() == [[95, a, b, 0], [95, c, 0, 96]]
    with pytest.raises(ValueError, match="outside the charset"):
        codec.encode(["\u00e9"])


def test_decode_cuts_at_first_eos_and_reports_probabilities() -> None:
    codec = CharCodec("abc")
    logits = np.full((1, 5, 4), -10.0, dtype=np.float32)
    for step, cls in enumerate([1, 3, 0, 2, 0]):  # a c EOS b EOS
        logits[0, step, cls] = 10.0
    logits[0, 1, 2] = 9.0  # second choice at position 1 is "b"
    (prediction,) = codec.decode(softmax(logits), topk=2)
    assert prediction.text == "ac"
    assert len(prediction.char_probs) == 2 and prediction.char_probs[1] < prediction.char_probs[0]
    assert [c for c, _ in prediction.topk[1]] == ["c", "b"]
    assert first_eos(np.array([[1, 2, 3]])).tolist() == [3]


def test_preprocess_resizes_without_aspect_and_normalises() -> None:
    spec = Preprocessing(32, 128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    white = Image.new("RGB", (40, 300), (255, 255, 255))
    black = Image.new("L", (10, 10), 0)
    batch = preprocess([white, black], spec)
    assert batch.shape == (2, 3, 32, 128) and batch.dtype == np.float32
    assert np.allclose(batch[0], 1.0) and np.allclose(batch[1], -1.0)


def test_bpe_ids_match_open_clip_on_random_charset_strings() -> None:
    open_clip = pytest.importorskip("open_clip", reason="open_clip (training extra) gives the reference ids")
    from runtime.tokenizer import BPETokenizer

    reference = open_clip.get_tokenizer("ViT-B-16")
    ours = BPETokenizer(open_clip.tokenizer.default_bpe())
    rng = np.random.default_rng(0)
    chars = np.array(list(CHARSET_94))
    texts = ["".join(rng.choice(chars, size=rng.integers(1, 26))) for _ in range(10_000)]
    texts += ["", "hello world", "a" * 40, "&amp;x", "&#65;b", "<start_of_text>z"]
    expected = reference(texts, context_length=16).numpy()
    got = ours(texts, context_length=16)
    mismatches = [t for t, e, g in zip(texts, expected, got) if not np.array_equal(e, g)]
    assert not mismatches, mismatches[:5]
