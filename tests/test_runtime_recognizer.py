"""The recognizer's pipeline on a numpy stand-in backend: inputs, batching, gate, LLM seam."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeBackend, FakeCorrector, barcode

from runtime.inputs import Sample, array_to_image
from runtime.preprocess import ImageError
from runtime.recognizer import STAGES, make_corrector


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_reads_every_input_kind(fake_recognizer, tmp_path: Path) -> None:
    recognizer = fake_recognizer()
    path = tmp_path / "word.png"
    barcode("path").save(path)
    inputs = [path, str(path), _png(barcode("bytes")), barcode("pil"), np.asarray(barcode("array")),
              np.asarray(barcode("grey").convert("L")), Sample("named", barcode("sample"), label="x")]
    results = recognizer.read(inputs)
    assert [r.text for r in results] == ["path", "path", "bytes", "pil", "array", "grey", "sample"]
    assert [r.source for r in results][:4] == [str(path), str(path), "<bytes 2>", "<image 3>"]
    assert results[4].source == "<array 4>" and results[6].source == "named" and results[6].label == "x"
    assert all(r.ok and r.vision_text == r.text for r in results)
    single = recognizer.read(barcode("one"))
    assert len(single) == 1 and single[0].text == "one"


def test_result_fields_and_json(fake_recognizer) -> None:
    result = fake_recognizer().read([barcode("abc")])[0]
    assert len(result.char_confidences) == 3
    assert result.confidence == pytest.approx(float(np.prod(result.char_confidences)))
    assert set(result.timings_ms) == set(STAGES)
    assert all(v >= 0 for v in result.timings_ms.values())
    data = json.loads(json.dumps(result.to_dict()))
    assert data["text"] == "abc" and data["error"] is None and data["llm"] is None
    assert "label" not in data


def test_batches_give_the_same_answers(fake_recognizer) -> None:
    recognizer = fake_recognizer()
    words = ["a", "bb", "ccc", "dddd", "e5", "f6g7", "hello", "x"]
    images = [barcode(w) for w in words]
    for batch_size in (1, 3, 8, 100):
        assert [r.text for r in recognizer.read(images, batch_size=batch_size)] == words
    calls = [c for c in recognizer.backend.calls if c[0] == "text_encoder"]
    # one text-encoder call per batch, AR and refined ids stacked: 2 x batch rows
    assert calls[-1][1]["text_ids"] == (16, 16)
    with pytest.raises(ValueError):
        recognizer.read(images, batch_size=0)


def test_gate_marks_uncertain_characters(fake_recognizer) -> None:
    clear, unsure = fake_recognizer().read([barcode("coffee"), barcode("coffee", {1: 0.5})])
    assert not clear.gated and clear.masked == []
    assert unsure.gated and unsure.masked == [1]
    assert unsure.char_confidences[1] < 0.8 <= min(unsure.char_confidences[:1] + unsure.char_confidences[2:])
    relaxed = fake_recognizer(threshold=0.4).read([barcode("coffee", {1: 0.5})])[0]
    assert not relaxed.gated
    with pytest.raises(ValueError):
        fake_recognizer(threshold=1.5)


def test_backend_failure_reports_each_image_of_the_batch(fake_recognizer) -> None:
    results = fake_recognizer(fail_on="cross_decoder").read([barcode("a"), b"not an image", barcode("b")])
    assert [r.ok for r in results] == [False, False, False]
    assert "fake failure in cross_decoder" in results[0].error
    assert "not an image" in results[1].error


# -- the LLM seam -----------------------------------------------------------------------------


def test_only_gated_words_reach_the_corrector(fake_recognizer) -> None:
    corrector = FakeCorrector()
    # band 1 halfway between 'o' and 'p': the decoder is unsure, its second choice differs
    clear, unsure = fake_recognizer(corrector).read([barcode("coffee"), barcode("coffee", {1: 0.5})])
    assert corrector.seen == [unsure.vision_text]
    assert clear.llm is None and clear.timings_ms["llm"] == 0.0
    assert unsure.llm is not None and unsure.llm.mode == "rescore"
    assert unsure.text != unsure.vision_text and unsure.llm.changed and unsure.llm_changed
    assert {unsure.text, unsure.vision_text} == {"coffee", "cpffee"}
    assert [(c["text"], c["score"]) for c in unsure.llm.candidates] == [(unsure.text, -1.0)]
    assert unsure.timings_ms["llm"] == pytest.approx(2.0)
    # the new character's confidence is the decoder's probability for it
    assert 0.3 < unsure.char_confidences[1] < 0.8


def test_corrector_answers_outside_the_charset_or_length_are_refused(fake_recognizer) -> None:
    for answer in ("COFFEE", "coffe", ""):  # outside the charset, shorter, empty
        result = fake_recognizer(FakeCorrector(answer)).read([barcode("coffee", {1: 0.5})])[0]
        assert result.text == result.vision_text
        assert not result.llm.changed and "refused" in result.llm.error


def test_corrector_failure_keeps_the_vision_answer(fake_recognizer) -> None:
    result = fake_recognizer(FakeCorrector(fail=True)).read([barcode("coffee", {1: 0.5}), barcode("tea")])
    assert [r.text for r in result] == [r.vision_text for r in result]
    assert "model crashed" in result[0].llm.error and result[1].llm is None


def test_make_corrector_specs(tmp_path: Path) -> None:
    assert make_corrector("none", "rescore", 0.8) is None
    assert make_corrector("NONE", "fill", 0.8) is None
    with pytest.raises(ValueError):
        make_corrector("none", "guess", 0.8)
    with pytest.raises(RuntimeError, match="cannot be used"):
        make_corrector(str(tmp_path / "missing.gguf"), "rescore", 0.8)


def test_real_corrector_on_fake_pipeline(fake_recognizer) -> None:
    """The real runtime.llm corrector with the default GGUF, when llama.cpp is installed."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    corrector = make_corrector("default", "rescore", 0.8)
    if corrector is None:
        pytest.skip("no default GGUF installed")
    result = fake_recognizer(corrector).read([barcode("coffee", {1: 0.5}), barcode("tea")])
    assert result[0].gated and result[0].llm is not None and result[0].llm.mode == "rescore"
    assert result[0].text in {"coffee", "cpffee"}
    assert result[1].llm is None and result[1].text == "tea"


# -- arrays ----------------------------------------------------------------------------------


def test_array_to_image_shapes_and_dtypes() -> None:
    assert array_to_image(np.zeros((4, 5), np.uint8)).size == (5, 4)
    assert array_to_image(np.zeros((4, 5, 1), np.uint8)).mode == "L"
    assert array_to_image(np.zeros((4, 5, 4), np.uint8)).mode == "RGBA"
    assert np.asarray(array_to_image(np.ones((2, 2, 3), np.float32)))[0, 0, 0] == 255
    assert np.asarray(array_to_image(np.full((2, 2), 65535, np.uint16)))[0, 0] == 255
    for bad in (np.zeros((4,)), np.zeros((4, 5, 2)), np.zeros((0, 5)), np.array([[np.nan]]),
                np.zeros((2, 2), np.complex64)):
        with pytest.raises(ImageError):
            array_to_image(bad)


def test_unsupported_input_type_is_a_per_input_error(fake_recognizer) -> None:
    results = fake_recognizer().read([barcode("ok"), 12345, barcode("fine")])
    assert [r.ok for r in results] == [True, False, True]
    assert "unsupported input type int" in results[1].error


def test_fake_backend_is_exact() -> None:
    """Guard for the fixtures: the stand-in reads what barcode() writes."""
    from runtime.preprocess import Preprocessing, preprocess

    x = preprocess([barcode("z9")], Preprocessing(8, 104, (0, 0, 0), (1, 1, 1)))
    logits = FakeBackend()._logits(FakeBackend().run("image_encoder", {"images": x})["image_features"])
    assert logits[0].argmax(-1)[:3].tolist() == [36, 10, 0]


def test_preprocess_failure_of_one_picture_is_isolated(fake_recognizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.recognizer as module

    real = module.preprocess

    def picky(pictures, spec):
        if any(p.size == (3, 3) for p in pictures):
            raise MemoryError("cannot resize this one")
        return real(pictures, spec)

    monkeypatch.setattr(module, "preprocess", picky)
    from PIL import Image

    results = fake_recognizer().read([barcode("ab"), Image.new("RGB", (3, 3)), barcode("cd")])
    assert [r.text for r in results] == ["ab", None, "cd"]
    assert "cannot resize this one" in results[1].error
