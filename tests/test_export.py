"""export.onnx and export.verify on a random clip4str-tiny checkpoint: the bundle, its
manifest, graph checks and lint, PyTorch parity (random and real images), dynamic batch, the
fp16/int8 variants and the verify report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageDraw
from shared_data import data_path

from export.lint import lint_model
from export.onnx import ExportError, add_precisions, dedupe_initializers, export_bundle
from export.precision import head_nodes
from export.verify import Sample, make_recognizers, reference_model, verify_set
from export.verify import main as verify_main
from runtime.bundle import load_bundle, sha256_file
from runtime.preprocess import load_image, preprocess
from training.model.clip4str import default_bpe_path

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
IC13 = data_path("eval", "ic13")
GRAPHS = ("image_encoder", "visual_decoder", "text_encoder", "cross_decoder")


def drawn_words() -> list[Sample]:
    samples = []
    for i, word in enumerate(["hello", "STOP", "cafe42", "x", "parking"]):
        image = Image.new("RGB", (30 + 12 * len(word), 32), (250 - 40 * i, 235, 190 + 12 * i))
        ImageDraw.Draw(image).text((5, 10), word, fill=(30 * i, 10, 80))
        samples.append(Sample(image, word))
    return samples


def real_words(n: int = 4) -> list[Sample]:
    labels = IC13 / "labels_857.tsv"
    if not labels.is_file():
        return []
    rows = [line.split("\t", 1) for line in labels.read_text(encoding="utf-8").splitlines()[:n]]
    return [Sample(load_image(IC13 / "images" / name), label) for name, label in rows]


@pytest.fixture(scope="module")
def variants(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fp32 tiny bundle with the fp16 and int8 variants added."""
    bundle = tmp_path_factory.mktemp("variants") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    add_precisions(bundle, ["fp16", "int8"])
    return bundle


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> torch.nn.Module:
    return reference_model(str(tiny_checkpoint))


def test_manifest_is_complete_and_hashes_match(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in ("schema_version", "model", "charset", "test_charset", "preprocessing", "decode", "threshold",
                "tokenizer", "graphs", "engines", "files", "created"):
        assert key in manifest, key
    on_disk = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert sha256_file(tiny_bundle / rel) == digest
    assert sha256_file(tiny_bundle / manifest["tokenizer"]["file"]) == sha256_file(default_bpe_path())
    assert manifest["decode"] == {"num_steps": 26, "refine_iters": 1, "fast": False, "autoregressive": True,
                                  "ctc_rescoring": False,
                                  "eos_id": 0, "bos_id": 95,
                                  "pad_id": 96, "text_context_length": 16, "topk": 5}
    assert manifest["preprocessing"]["height"] == 32 and manifest["preprocessing"]["width"] == 128
    assert len(manifest["charset"]) == 94 and manifest["test_charset"] == "0123456789abcdefghijklmnopqrstuvwxyz"
    graphs = manifest["graphs"]["fp32"]
    assert set(graphs) == set(GRAPHS)
    assert graphs["image_encoder"]["inputs"] == [{"name": "images", "shape": ["batch", 3, 32, 128],
                                                  "dtype": "float32"}]
    assert graphs["text_encoder"]["inputs"] == [{"name": "text_ids", "shape": ["batch", 16], "dtype": "int64"}]
    assert [t["name"] for t in graphs["cross_decoder"]["inputs"]] == [
        "image_features", "text_features_ar", "text_features_refined"]
    for name in ("visual_decoder", "cross_decoder"):
        assert graphs[name]["outputs"] == [
            {"name": "ar_logits", "shape": ["batch", 26, 95], "dtype": "float32"},
            {"name": "refined_logits", "shape": ["batch", 26, 95], "dtype": "float32"}]
    weights = manifest["created"]["checkpoint"]["weights_sha256"]
    assert weights == sha256_file(tiny_checkpoint / "model.safetensors")
    load_bundle(tiny_bundle)  # the runtime's own check of the contract


def test_every_graph_passes_the_checker_and_the_lint(variants: Path) -> None:
    manifest = json.loads((variants / "manifest.json").read_text())
    report = manifest["created"]["graphs"]
    files = {(name, entry["file"]) for entries in manifest["graphs"].values() for name, entry in entries.items()}
    assert len(files) == 4 + 4 + 2  # int8 shares the fp32 decoders
    for name, rel in sorted(files):
        onnx.checker.check_model(str(variants / rel), full_check=True)
        assert lint_model(variants / rel, min_layernorms=report[name]["min_layernorms"]) == [], rel


def test_fp16_keeps_layernorm_softmax_and_head_in_fp32(variants: Path) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(variants / "fp16" / "visual_decoder.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) == 135 + 54  # 27 decoder calls x (5 LayerNorms, 2 attentions)
    heads = [n for n in model.graph.node if n.name in set(head_nodes(model)) and n.op_type != "Cast"]
    assert len(heads) >= 27
    argmaxes = [n for n in model.graph.node if n.op_type == "ArgMax"]
    assert len(argmaxes) == 26
    for node in [*kept, *heads, *argmaxes]:  # the logits the argmax reads are FP32 too
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    assert any(t == onnx.TensorProto.FLOAT16 for t in types.values())  # the rest did convert


def _ort(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_dynamic_batch_one_and_three(tiny_bundle: Path, model: torch.nn.Module) -> None:
    images = preprocess([s.image for s in drawn_words()[:3]], model.cfg.image)
    encoder, decoder = _ort(tiny_bundle / "fp32/image_encoder.onnx"), _ort(tiny_bundle / "fp32/visual_decoder.onnx")
    features = encoder.run(None, {"images": images})[0]
    assert features.shape[0] == 3
    ar3, refined3 = decoder.run(None, {"image_features": features})
    single = encoder.run(None, {"images": images[1:2]})[0]
    ar1, refined1 = decoder.run(None, {"image_features": single})
    assert ar1.shape == (1, 26, 95) and ar3.shape == (3, 26, 95)
    np.testing.assert_allclose(ar1[0], ar3[1], atol=1e-4)
    np.testing.assert_allclose(refined1[0], refined3[1], atol=1e-4)
    with torch.no_grad():
        expected = model(torch.from_numpy(images), early_exit=False)
    np.testing.assert_allclose(ar3, expected["visual_ar"].numpy(), atol=1e-4)
    np.testing.assert_allclose(refined3, expected["visual_refined"].numpy(), atol=1e-4)


def test_fp32_bundle_matches_pytorch_on_random_and_real_images(tiny_bundle: Path, model: torch.nn.Module) -> None:
    samples = drawn_words() + real_words()
    recognizers = make_recognizers(str(tiny_bundle), ["fp32"], threads=1)
    result = verify_set(model, recognizers, samples, batch_size=4)
    fp32 = result["precisions"]["fp32"]
    assert result["n"] == len(samples) and fp32["errors"] == 0
    assert fp32["identical_pct"] == 100.0
    assert len(fp32["max_abs_diff"]) == 7
    for key, diff in fp32["max_abs_diff"].items():
        assert diff < 1e-3, (key, diff)
    assert fp32["accuracy"] == {k: result["pytorch"][k] for k in ("n", "accuracy", "ned")}


def test_fp16_and_int8_variants_run(variants: Path, model: torch.nn.Module) -> None:
    manifest = json.loads((variants / "manifest.json").read_text())
    assert manifest["graphs"]["int8"]["visual_decoder"]["file"] == "fp32/visual_decoder.onnx"
    assert manifest["graphs"]["int8"]["image_encoder"]["file"] == "int8/image_encoder.onnx"
    size = {p: (variants / p / "text_encoder.onnx").stat().st_size for p in ("fp32", "int8")}
    assert size["int8"] < size["fp32"] / 2
    recognizers = make_recognizers(str(variants), ["fp32", "fp16", "int8"], threads=1)
    result = verify_set(model, recognizers, drawn_words(), batch_size=5)
    for precision in ("fp16", "int8"):
        stats = result["precisions"][precision]
        assert stats["errors"] == 0 and "identical_to_fp32_pct" in stats
        # image features depend on no argmax upstream: close to PyTorch, but not exact
        assert 0 < stats["max_abs_diff"]["image_encoder.image_features"] < 0.5, precision


def test_verify_runs_every_graph_on_every_crop(tiny_bundle: Path) -> None:
    """A bundle whose default decode is the cascade runs its decoders only for gated words;
    verify compares every graph with PyTorch, so its recognizers decode in full."""
    recognizers = make_recognizers(str(tiny_bundle), ["fp32"], threads=1)
    assert all(r.decode == "full" for r in recognizers.values())


def test_verify_cli_prints_one_json_line(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    lines = []
    for i, sample in enumerate(drawn_words()):
        sample.image.save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png\t{sample.label}")
    lines.append("long.png\t" + "x" * 30)  # over 25 characters: dropped by the protocol
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    code = verify_main([str(tiny_bundle), "--ckpt", str(tiny_checkpoint), str(root), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = report["sets"]["set"]
    assert result["n"] == 5 and result["dropped"] == 1
    assert result["precisions"]["fp32"]["identical_pct"] == 100.0
    assert report["total"]["pytorch"]["n"] == 5


def test_export_refuses_to_overwrite_a_non_bundle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(tiny_checkpoint, keep)
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(ExportError, match="not a readable checkpoint"):
        export_bundle(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ExportError, match="precision"):
        export_bundle(tiny_checkpoint, tmp_path / "out", precisions=("fp8",))
    assert not (tmp_path / "out").exists()


def test_dedupe_merges_identical_weights() -> None:
    weights = [onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), name) for name in ("a", "b")]
    weights.append(onnx.numpy_helper.from_array(np.zeros((2, 2), np.float32), "c"))
    nodes = [onnx.helper.make_node("Add", ["x", "a"], ["y"]), onnx.helper.make_node("Add", ["y", "b"], ["z"]),
             onnx.helper.make_node("Add", ["z", "c"], ["out"])]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 2])
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [out], weights))
    assert dedupe_initializers(model) == 1
    assert [i.name for i in model.graph.initializer] == ["a", "c"]
    assert list(model.graph.node[1].input) == ["y", "a"]
