"""The PP-OCR-tower model through the pipeline: a dynamic-width bundle that gives PyTorch's
answers at every width, TensorRT profiles over the width, the frozen-tower trainer, and the
embedded default bundle reading the quick start's samples."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "runtime" / "assets" / "samples"


def test_default_bundle_reads_every_sample() -> None:
    """The quick start's promise: every shipped sample image (named after its word) is read."""
    from runtime.bundle import DEFAULT_BUNDLE
    from runtime.recognizer import Recognizer

    recognizer = Recognizer.from_bundle(DEFAULT_BUNDLE, backend="ort-cpu", llm="none", threads=1)
    try:
        paths = sorted(SAMPLES.glob("*.png"))
        results = recognizer.read([str(p) for p in paths], batch_size=4)
    finally:
        recognizer.close()
    assert len(paths) >= 8
    assert {p.stem: r.text.lower() for p, r in zip(paths, results)} == {p.stem: p.stem.lower() for p in paths}


def test_default_bundle_reads_a_word_the_same_in_any_batch() -> None:
    """Recognizer.read batches crops of equal padded width only, so a word's reading and
    confidences do not depend on its batch neighbours (padded to the widest, they did)."""
    from runtime.bundle import DEFAULT_BUNDLE
    from runtime.recognizer import Recognizer

    images = []
    for path in sorted(SAMPLES.glob("*.png")):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        for stretch in (1.0, 1.6, 2.4):  # the same words at other widths: several width groups
            images.append(image.resize((max(8, int(image.width * stretch)), image.height)))
    recognizer = Recognizer.from_bundle(DEFAULT_BUNDLE, backend="ort-cpu", llm="none", threads=1)
    try:
        alone = recognizer.read(images, batch_size=1)
        together = recognizer.read(images, batch_size=16)
    finally:
        recognizer.close()
    widths = {recognizer.bundle.preprocessing.batch_width([recognizer.bundle.preprocessing.image_width(i.size)])
              for i in images}
    assert len(widths) >= 3
    assert [r.text for r in together] == [r.text for r in alone]
    for a, b in zip(alone, together):
        assert np.allclose(a.char_confidences, b.char_confidences, atol=1e-4)


def test_width_groups_batch_equal_widths_in_order() -> None:
    from runtime.preprocess import Preprocessing, width_groups

    spec = Preprocessing(height=48, width=320, keep_aspect=True, width_multiple=8, pad_width=64)
    sizes = [(100, 48), (30, 48), (101, 48), (20, 48), (300, 24), (600, 48), (96, 48)]
    # padded widths: 104, 64, 104, 64, 320, 320, 96
    assert width_groups(sizes, spec, 8) == [[0, 2], [1, 3], [4, 5], [6]]
    assert width_groups(sizes, spec, 1) == [[i] for i in range(7)]
    assert sorted(i for batch in width_groups(sizes, spec, 2) for i in batch) == list(range(7))
    fixed = Preprocessing(height=32, width=128)
    assert width_groups(sizes, fixed, 4) == [[0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError):
        width_groups(sizes, spec, 0)


def test_default_bundle_is_the_ppocr_tower_model() -> None:
    from runtime.bundle import DEFAULT_BUNDLE

    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    assert manifest["model"]["image_tower"] == "ppocrv6-rec-small"
    assert manifest["preprocessing"]["keep_aspect"] is True and manifest["preprocessing"]["height"] == 48
    assert manifest["preprocessing"]["pad_width"] == 224 and manifest["decode"]["ctc_rescoring"] is True
    sizes = sum(p.stat().st_size for p in DEFAULT_BUNDLE.rglob("*") if p.is_file())
    assert sizes <= 50 * 2**20, sizes  # checkpoint + fp32 + int8 graphs within 50 MB
    image = manifest["graphs"]["fp32"]["image_encoder"]
    assert image["inputs"][0]["shape"] == ["batch", 3, 48, "width"]
    assert image["outputs"][0]["shape"][:2] == ["batch", "tokens"]


def test_trt_profiles_cover_the_dynamic_width() -> None:
    from export.trt import BuildSettings, dynamic_axis_ranges, profile_shapes

    pre = {"height": 48, "width": 320, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    manifest = {"preprocessing": {**pre, "keep_aspect": True, "width_multiple": 8}}
    axes = dynamic_axis_ranges(manifest)
    assert dict(axes) == {"width": (8, 160, 320), "tokens": (1, 20, 40)}
    settings = BuildSettings(1, 8, 32, axes=axes)
    assert profile_shapes(["batch", 3, 48, "width"], settings) == [(1, 3, 48, 8), (8, 3, 48, 160), (32, 3, 48, 320)]
    assert profile_shapes(["batch", "tokens", 256], settings)[2] == (32, 40, 256)
    assert dynamic_axis_ranges({"preprocessing": {**pre, "width": 128}}) == ()
    with pytest.raises(ValueError, match="no profile range"):
        profile_shapes(["batch", "width"], BuildSettings())


# -- a small model with the real tower, exported -------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("rapidocr", reason="the PP-OCR tower needs the rapidocr package (train extra)")
pytest.importorskip("onnx", reason="export needs the export extra")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A PP-OCR-tower checkpoint with narrow decoders (random) and its fp32 + int8 bundle."""
    from export.onnx import export_bundle
    from training.checkpoint import save_checkpoint
    from training.config import DecoderConfig, model_config
    from training.model.clip4str import CLIP4STR

    cfg = model_config("clipllama-ppocr")
    clip = {**cfg.clip, "embed_dim": 32,
            "text_cfg": {**cfg.clip["text_cfg"], "width": 32, "heads": 2, "layers": 1, "vocab_size": 49408}}
    # no minimum padding: the graphs must run at every width a crop gives
    cfg = replace(cfg, clip=clip, decoder=DecoderConfig(depth=1, heads=2, mlp_ratio=2.0, dropout=0.0),
                  image=replace(cfg.image, pad_width=0))
    torch.manual_seed(0)
    model = CLIP4STR(cfg).eval()
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("ppocr_ckpt"), half=True)
    bundle = export_bundle(ckpt, tmp_path_factory.mktemp("ppocr_bundle") / "b", precisions=("fp32", "int8"))
    return ckpt, Path(bundle)


def _words() -> list[Image.Image]:
    from training.data.synth import SynthWords

    data = SynthWords(6, 5)
    return [data[i][0] for i in range(len(data))] + [Image.new("RGB", (400, 30), "gray")]


def test_dynamic_width_bundle_equals_pytorch_at_every_width(small: tuple[Path, Path]) -> None:
    """Crops of different aspect ratios, alone and in one padded batch: the ONNX graphs give
    PyTorch's logits (the same weights: an FP16 checkpoint, FP32 graphs with FP16 storage)."""
    from runtime.backends import OrtBackend
    from runtime.bundle import load_bundle
    from runtime.preprocess import preprocess
    from training.checkpoint import load_checkpoint

    ckpt, path = small
    model = load_checkpoint(ckpt)
    bundle = load_bundle(path)
    backend = OrtBackend(bundle, "fp32", threads=1)
    images = _words()
    widths = set()
    for batch in [[image] for image in images] + [images]:
        x = preprocess(batch, bundle.preprocessing)
        widths.add(x.shape[-1])
        got = backend.run("image_encoder", {"images": x})["image_features"]
        with torch.no_grad():
            expected = model.encode_image(torch.from_numpy(x)).numpy()
        assert got.shape == expected.shape == (len(batch), x.shape[-1] // 8, 32)
        assert np.abs(got - expected).max() < 1e-3
        visual = backend.run("visual_decoder", {"image_features": got})
        with torch.no_grad():
            reference = model.decode(torch.from_numpy(expected), early_exit=False)
        assert np.abs(visual["ar_logits"] - reference["visual_ar"].numpy()).max() < 1e-3
    assert len(widths) >= 4  # the graphs really ran at several widths
    backend.close()


def test_bundle_words_equal_pytorch_with_ctc_rescoring(small: tuple[Path, Path]) -> None:
    """The config's CTC rescoring runs in the bundle as in PyTorch (one decoding function):
    same words, and the tower's CTC reading really is chosen for some words (the decoders
    here are random, the tower and its CTC classifier are PP-OCR's)."""
    from runtime.bundle import load_bundle
    from runtime.preprocess import preprocess
    from runtime.recognizer import Recognizer
    from training.checkpoint import load_checkpoint

    ckpt, path = small
    model = load_checkpoint(ckpt)
    assert model.cfg.ctc_rescoring
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["decode"]["ctc_rescoring"] is True
    assert [o["name"] for o in manifest["graphs"]["fp32"]["image_encoder"]["outputs"]] == [
        "image_features", "ctc_log_probs"]
    images = _words()
    recognizer = Recognizer.from_bundle(path, backend="ort-cpu", llm="none", threads=1)
    try:
        got = [r.vision_text for r in recognizer.read(images, batch_size=1)]
    finally:
        recognizer.close()
    bundle = load_bundle(path)
    with torch.no_grad():
        outs = [model(torch.from_numpy(preprocess([image], bundle.preprocessing))) for image in images]
    expected = [model.predictions(out)[0].text for out in outs]
    plain = [model.codec.decode(out["final"].softmax(-1).numpy())[0].text for out in outs]
    assert got == expected
    assert got != plain


def test_weights_are_stored_half_only_where_exact(small: tuple[Path, Path]) -> None:
    import onnx

    _, path = small
    graph = onnx.load(str(path / "fp32" / "image_encoder.onnx")).graph
    halves = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves and all(any(n.op_type == "Cast" and i.name in n.input for n in graph.node) for i in halves)
    manifest = json.loads((path / "manifest.json").read_text())
    # the conv tower's int8 variant would barely shrink: the int8 entry reuses the fp32 file
    assert manifest["graphs"]["int8"]["image_encoder"]["file"] == "fp32/image_encoder.onnx"
    assert manifest["graphs"]["int8"]["text_encoder"]["file"] == "int8/text_encoder.onnx"


def test_frozen_tower_trainer_learns_from_a_cache(tmp_path: Path) -> None:
    """cache -> train on a few synthetic words: a checkpoint, and the loss falls."""
    from training.frozen_tower import main

    cache = ["cache", "--config", "clipllama-ppocr", "-o", str(tmp_path / "c"), "--synth-shards", "1",
             "--synth-shard-size", "48"]
    assert main(cache) == 0
    shards = sorted(p.name for p in (tmp_path / "c").glob("*.npz"))
    assert shards == ["synth000.npz", "val.npz"]
    stamp = (tmp_path / "c" / "synth000.npz").stat().st_mtime_ns
    assert main(cache) == 0 and (tmp_path / "c" / "synth000.npz").stat().st_mtime_ns == stamp  # resumes
    with np.load(tmp_path / "c" / "synth000.npz") as shard:
        assert len(shard["labels"]) == 48 and shard["tokens"].shape == (shard["lengths"].sum(), 120)
    train = ["train", "--config", "clipllama-ppocr", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r"),
             "--minutes", "5", "--max-steps", "24", "--warmup-steps", "2", "--val-every", "8", "--batch-size", "16",
             "--ctc-weight", "0.5"]  # a step count, not a time: the loss must fall on a loaded machine too
    assert main(train) == 0
    lines = [json.loads(line) for line in (tmp_path / "r" / "log.csv").read_text().splitlines()]
    assert (tmp_path / "r" / "best" / "model.safetensors").is_file() and (tmp_path / "r" / "last").is_dir()
    assert len(lines) >= 2 and min(x["loss"] for x in lines[1:]) < lines[0]["loss"]
    assert all("ctc_loss" in x for x in lines)


def test_frozen_tower_trainer_mixes_covered_words_and_reports_extra_validation(tmp_path: Path) -> None:
    """--cover-shards caches covered synthetic words (used only with --cover-share);
    --extra-val sets are reported beside the split and weigh in the checkpoint choice."""

    from training.frozen_tower import main

    extra = tmp_path / "occ"
    (extra / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (90, 30), "white").save(extra / "images" / f"{i}.png")
    (extra / "labels.tsv").write_text("0.png\tRescue\n1.png\tmarket\n")
    cache = ["cache", "--config", "clipllama-ppocr", "-o", str(tmp_path / "c"), "--synth-shards", "1",
             "--synth-shard-size", "24", "--cover-shards", "1", "--extra-val", str(extra)]
    assert main(cache) == 0
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npz")) == [
        "cover000.npz", "synth000.npz", "val-occ.npz", "val.npz"]
    with np.load(tmp_path / "c" / "val-occ.npz") as shard:
        assert shard["labels"].tolist() == ["Rescue", "market"]
    train = ["train", "--config", "clipllama-ppocr", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r"),
             "--max-steps", "2", "--val-every", "2", "--batch-size", "8", "--cover-share", "0.5",
             "--extra-val-weight", "0.5", "--fill-gaps"]
    assert main(train) == 0
    line = json.loads((tmp_path / "r" / "log.csv").read_text().splitlines()[-1])
    assert line["score"] == pytest.approx(line["accuracy"] + 0.5 * line["occ_accuracy"])


def test_share_weights_give_each_group_its_share() -> None:
    from training.frozen_tower import share_weights

    shards = [Path(n) for n in ("real.npz", "real-aug0.npz", "synth000.npz", "cover000.npz")]
    sizes = [10, 30, 50, 20]
    weights = share_weights(shards, sizes, {"real": 0.4, "cover": 0.25})
    assert weights[:40].sum() == pytest.approx(0.4) and weights[90:].sum() == pytest.approx(0.25)
    assert weights[40:90].sum() == pytest.approx(0.35) and np.allclose(weights[:40], 0.01)
    assert share_weights(shards, sizes, {"real": None}) is None
    with pytest.raises(ValueError):
        share_weights(shards, sizes, {"real": 0.8, "cover": 0.5})
