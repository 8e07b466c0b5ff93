"""The PP-OCRv6 image tower: weights from the rapidocr wheel, same features as its ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shared_data import data_path, require

pytest.importorskip("rapidocr", reason="the PP-OCR tower needs the rapidocr package (train extra)")
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from runtime.preprocess import Preprocessing, load_image, preprocess  # noqa: E402
from training.config import model_config  # noqa: E402
from training.model.ppocr_tower import FEATURE_DIM, PPOCRFeatures, feature_graph, onnx_path  # noqa: E402


def _real_crops(count: int) -> list:
    """The first ``count`` IC13 crops (real scene text); the test skips without the real data
    (synthetic words reach larger features, past the float64 bound: 1.2e-4 measured)."""
    labels = require("eval", "ic13", "labels_857.tsv")
    names = [line.split("\t")[0] for line in labels.read_text(encoding="utf-8").splitlines()[:count]]
    return [load_image(labels.parent / "images" / name) for name in names]


def _crops(count: int) -> tuple[list, list[str] | None]:
    """The first ``count`` IC13 crops and their labels when the real data is here, else
    synthetic words (no labels: the PP-OCR head need not read them right)."""
    labels = data_path("eval", "ic13", "labels_857.tsv")
    if labels.is_file():
        rows = [line.split("\t") for line in labels.read_text(encoding="utf-8").splitlines()[:count]]
        return [load_image(labels.parent / "images" / name) for name, _ in rows], [label for _, label in rows]
    from training.data.synth import SynthWords

    return [SynthWords(count, 3)[i][0] for i in range(count)], None


@pytest.fixture(scope="module")
def tower() -> PPOCRFeatures:
    return PPOCRFeatures().eval()


def test_onnx_file_is_found_through_the_import_system() -> None:
    path = onnx_path("ppocrv6-rec-small")
    assert path.is_file() and path.stat().st_size > 1_000_000


def test_torch_tower_matches_the_packaged_onnx_on_20_real_crops(tower: PPOCRFeatures, tmp_path: Path) -> None:
    """The module's maths (float64) is within 1e-4 of onnxruntime's features on each of 20
    real crops at its own width; in float32 the two differ by float32 rounding only.

    The features reach |f| ~ 30, so 1e-4 is ~3e-6 relative: float32 itself is that coarse
    (onnxruntime's float32 features differ from the float64 ones by up to ~1e-4 per crop
    and ~3e-4 on a padded batch, measured), hence the float32 bounds below."""
    from dataclasses import replace

    spec = replace(model_config("clipllama-ppocr").image, pad_width=0)  # each crop at its own width
    session = ort.InferenceSession(str(feature_graph("ppocrv6-rec-small", tmp_path / "f.onnx")),
                                   providers=["CPUExecutionProvider"])
    exact = PPOCRFeatures().eval().double()
    crops = _real_crops(20)
    worst64 = worst32 = 0.0
    for image in crops:
        x = preprocess([image], spec)
        expected = session.run(None, {"x": x})[0]
        with torch.no_grad():
            got = tower(torch.from_numpy(x)).numpy()
            got64 = exact(torch.from_numpy(x).double()).numpy()
        assert got.shape == expected.shape == (1, x.shape[-1] // 8, FEATURE_DIM)
        worst64 = max(worst64, float(np.abs(got64 - expected).max()))
        worst32 = max(worst32, float(np.abs(got - expected).max()))
    assert worst64 <= 1e-4, worst64
    assert worst32 <= 3e-4, worst32
    batch = preprocess(crops, spec)
    with torch.no_grad():
        got = tower(torch.from_numpy(batch)).numpy()
    assert float(np.abs(got - session.run(None, {"x": batch})[0]).max()) <= 2e-3


def test_random_init_differs_from_the_loaded_weights(tower: PPOCRFeatures) -> None:
    """The weights really come from the file (not the module's own initialisation)."""
    fresh = PPOCRFeatures(load_weights=False).eval()
    x = torch.zeros(1, 3, 48, 64)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), tower(x))


def test_training_mode_computes_as_inference(tower: PPOCRFeatures) -> None:
    """Paddle's backbone pools to 40 tokens in training mode; the tower never does, and its
    batch norms keep their statistics, so fine-tuning sees the features inference sees."""
    x = torch.randn(2, 3, 48, 96)
    with torch.no_grad():
        expected = tower(x)
        tower.train()
        try:
            assert not any(m.training for m in tower.modules())
            assert torch.equal(tower(x), expected) and expected.shape[1] == 12
        finally:
            tower.eval()


def test_aspect_keeping_preprocessing() -> None:
    """Height 48, width from the aspect (capped), right-padded with zeros to the batch width."""
    from PIL import Image

    spec = Preprocessing(48, 320, (0.5,) * 3, (0.5,) * 3, "bilinear", keep_aspect=True, width_multiple=8)
    wide, narrow, tall = Image.new("RGB", (400, 40), "white"), Image.new("RGB", (60, 30), "white"), \
        Image.new("RGB", (10, 100), "white")
    assert spec.image_width(wide.size) == 320
    assert spec.image_width(narrow.size) == 96
    assert spec.image_width(tall.size) == 8
    alone = preprocess([narrow], spec)
    assert alone.shape == (1, 3, 48, 96)
    batch = preprocess([narrow, wide, tall], spec)
    assert batch.shape == (3, 3, 48, 320)
    assert np.allclose(batch[0, :, :, :96], 1.0) and np.all(batch[0, :, :, 96:] == 0)
    assert np.array_equal(batch[0, :, :, :96], alone[0])
    odd = Image.new("RGB", (101, 48), "white")  # 101 px -> 104 (next multiple of 8)
    assert preprocess([odd], spec).shape[-1] == 104
    with pytest.raises(ValueError):
        Preprocessing(48, 100, keep_aspect=True, width_multiple=8)


def test_padding_to_a_minimum_width() -> None:
    """``pad_width``: every batch is at least that wide (zeros after the image), the model's
    narrowest input and TensorRT's smallest profile width follow, and it round-trips."""
    from dataclasses import replace

    from PIL import Image

    spec = Preprocessing(48, 320, (0.5,) * 3, (0.5,) * 3, "bilinear", keep_aspect=True, width_multiple=8,
                         pad_width=224)
    narrow, wide = Image.new("RGB", (60, 30), "white"), Image.new("RGB", (300, 40), "white")
    alone = preprocess([narrow], spec)
    assert alone.shape == (1, 3, 48, 224)
    assert np.allclose(alone[0, :, :, :96], 1.0) and np.all(alone[0, :, :, 96:] == 0)
    assert preprocess([wide], spec).shape[-1] == 320  # wider crops keep their own width
    assert spec.min_width == spec.typical_width == 224
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    assert Preprocessing.from_dict({k: v for k, v in spec.to_dict().items() if k != "pad_width"}).pad_width == 0
    for bad in (-8, 100, 328):
        with pytest.raises(ValueError, match="pad_width"):
            replace(spec, pad_width=bad)
    assert model_config("clipllama-ppocr").image.pad_width == 224


def test_char_index_counts_the_characters(tower: PPOCRFeatures) -> None:
    """PP-OCR's own CTC classifier (restricted to blank + the charset) reads the word, and
    the index it gives each token runs 0, 1, ... over the characters in order."""
    from runtime.charset import resolve_charset
    from runtime.decoding import CharCodec
    from training.model.ppocr_tower import CTCEncoding

    charset = resolve_charset("94")
    encoding = CTCEncoding("ppocrv6-rec-small", charset, width=16, max_chars=26)
    crops, labels = _crops(5)
    spec = model_config("clipllama-ppocr").image
    codec = CharCodec(charset)
    for i, image in enumerate(crops):
        with torch.no_grad():
            features = tower(torch.from_numpy(preprocess([image], spec)))
            best = encoding.classifier(features)[0].argmax(-1).tolist()
            index = encoding.char_index(features)[0]
        # greedy CTC reading: drop repeats and blanks
        read = "".join(codec.charset[c - 1] for j, c in enumerate(best) if c and (j == 0 or c != best[j - 1]))
        if labels is not None:
            assert read == labels[i]
        shown = [round(float(index[j])) for j, c in enumerate(best) if c and (j == 0 or c != best[j - 1])]
        assert shown == list(range(len(read)))
        blanks = [j for j, c in enumerate(best) if c == 0]
        assert all(abs(float(index[j]) % 1 - 0.5) < 0.1 for j in blanks)  # between two characters
        assert torch.all(index[1:] >= index[:-1] - 0.25)  # runs forward
        assert encoding(features).shape == (1, features.shape[1], 16)
