"""Static INT8 of the image encoder (export.static_int8) on the random clip4str-tiny bundle:
the QDQ graph is produced, loads in the runtime, the exclusions are honoured and recorded
in the manifest, and the manifest round-trips; plus the helpers (half storage undone,
layer groups, the calibration reader) and the command line's refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageDraw

from export import static_int8
from export.onnx import StaticInt8, add_precisions
from export.onnx import main as export_main
from export.precision import store_exact_half
from export.verify import describe_variant
from runtime.bundle import load_bundle
from runtime.recognizer import Recognizer

WORDS = ["hello", "STOP", "cafe42", "x", "parking", "open", "exit", "bakery", "2026", "coffee", "pizza", "taxi"]


def _word_set(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, word in enumerate(WORDS):
        image = Image.new("RGB", (30 + 12 * len(word), 32), (250 - 15 * i, 235, 190 + 5 * i))
        ImageDraw.Draw(image).text((5, 10), word, fill=(20 * i % 255, 10, 80))
        image.save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png\t{word}\n")
    (root / "labels.tsv").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def static_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the tiny bundle with a static int8 image encoder (minmax, sensitivity pass)."""
    work = tmp_path_factory.mktemp("static")
    bundle = work / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    words = _word_set(work / "words")
    add_precisions(bundle, ["int8"], static=StaticInt8(str(words), [str(words)], method="minmax", crops=12,
                                                       tolerance=0.0, threads=1))
    return bundle, words


def test_static_graph_is_qdq_loads_and_reads(static_bundle: tuple[Path, Path]) -> None:
    bundle, words = static_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["graphs"]["int8"]["image_encoder"]
    assert entry["file"] == "int8/image_encoder.onnx"
    model = onnx.load(str(bundle / entry["file"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # per-channel weights: a weight's scale has one value per output channel
    scales = [i for i in model.graph.initializer if i.name.endswith("weight_scale")]
    assert scales and any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    loaded = load_bundle(bundle)  # hashes in 'files' match what is on disk
    recognizer = Recognizer(loaded, __import__("runtime.backends", fromlist=["x"]).select_backend(
        loaded, "ort-cpu", "int8", threads=1))
    results = recognizer.read(sorted((words / "images").glob("*.png")), batch_size=4)
    assert len(results) == len(WORDS) and all(r.ok for r in results)
    recognizer.close()


def test_exclusions_are_recorded_and_honoured(static_bundle: tuple[Path, Path]) -> None:
    bundle, _ = static_bundle
    record = json.loads((bundle / "manifest.json").read_text())["graphs"]["int8"]["image_encoder"]["quantization"]
    assert record["mode"] == "static" and record["calibration"]["method"] == "minmax"
    assert record["calibration"]["crops"] == len(WORDS)
    ranked = record["sensitivity"]
    assert ranked and all({"group", "ctc_accuracy_drop", "changed_strings", "feature_error"} <= set(r)
                          for r in ranked)
    costs = [static_int8.group_cost(r) for r in ranked]
    assert costs == sorted(costs, reverse=True)  # most costly first
    assert any(r["feature_error"] > 0 for r in ranked)  # quantizing a group moves the outputs
    assert record["exclusion_steps"][0]["excluded_groups"] == 0
    assert record["validation"]["fp32"]["accuracy"].keys() == record["validation"]["int8"]["accuracy"].keys()
    # whatever was excluded stays FP32 in the graph: no DequantizeLinear feeds those nodes
    model = onnx.load(str(bundle / "int8/image_encoder.onnx"))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    excluded = {name for e in record["excluded"] for name in e["nodes"]}
    for node in model.graph.node:
        if node.name in excluded:
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input), node.name
    assert record["quantized_nodes"] == len(static_int8.quantizable_nodes(model)) - len(excluded) or excluded == set()
    assert "static int8" in describe_variant(json.loads((bundle / "manifest.json").read_text()), "int8")[
        "image_encoder"]


def test_explicit_exclusion_round_trips_through_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    """Quantize with a chosen group kept FP32 (``--keep-fp32``, no sensitivity pass): its
    nodes stay float in the graph, the manifest lists it, the runtime loads the bundle, and
    reading the manifest back gives the same record; an unknown group is refused."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    words = _word_set(tmp_path / "words")
    fp32_file = load_bundle(bundle, verify=False).graph("fp32", "image_encoder").file
    groups = static_int8.layer_groups(static_int8.prepare(bundle / fp32_file, tmp_path / "prepared.onnx"))
    kept = next(iter(groups))
    add_precisions(bundle, ["int8"], static=StaticInt8(str(words), [], method="minmax", crops=6,
                                                       sensitivity=False, threads=1, keep_fp32=(kept,)))
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["graphs"]["int8"]["image_encoder"]["quantization"]
    assert record["excluded"] == [{"group": kept, "nodes": groups[kept], "reason": "--keep-fp32"}]
    assert "sensitivity" not in record
    graph = onnx.load(str(bundle / "int8" / "image_encoder.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_nodes = [n for n in graph.node if n.name in groups[kept]]
    assert float_nodes and not any(i in dequantized for n in float_nodes for i in n.input[:2])
    again = json.loads(json.dumps(manifest))
    assert again["graphs"]["int8"]["image_encoder"]["quantization"] == record
    load_bundle(bundle)
    assert export_main([str(bundle), "--precision", "int8", "--calibration", str(words), "--no-sensitivity",
                        "--keep-fp32", "no/such/group"]) == 1


def test_unpack_half_undoes_half_storage(tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "enc.onnx"
    model = onnx.load(str(tiny_bundle / "fp32/image_encoder.onnx"))
    for init in model.graph.initializer:  # make the weights exactly representable in fp16
        array = onnx.numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float16).astype(np.float32), init.name))
    onnx.save(model, str(src))
    assert store_exact_half(src) > 0
    half = onnx.load(str(src))
    assert static_int8.unpack_half(half) > 0
    assert not any(n.op_type == "Cast" and n.name.endswith("__cast") for n in half.graph.node)
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in half.graph.initializer}
    for name, array in after.items():
        assert array.dtype == before[name].dtype
        np.testing.assert_array_equal(array, before[name])
    onnx.checker.check_model(half)


def test_layer_groups_and_the_calibration_reader(tiny_bundle: Path, tmp_path: Path) -> None:
    assert static_int8.group_of("/features/backbone/blocks4/blocks4.1/token_mixer/Conv") == \
        "features/backbone/blocks4/blocks4.1"
    assert static_int8.group_of("/proj/MatMul") == "proj" and static_int8.group_of("Gemm_3") == "other"
    bundle = load_bundle(tiny_bundle)
    images, labels = static_int8.load_crops(_word_set(tmp_path / "w"), limit=5)
    assert len(images) == 5 and all(labels)
    batches = static_int8.crop_batches(images, bundle.preprocessing, batch=2)
    reader = static_int8.CropBatches(batches)
    first = [reader.get_next() for _ in range(len(batches) + 1)]
    assert first[-1] is None and sum(len(b["images"]) for b in first[:-1]) == 5
    reader.rewind()
    assert reader.get_next()["images"].shape[1:] == batches[0].shape[1:]


def test_command_line_refusals(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        export_main([str(tiny_bundle), "--calibration", str(tmp_path)])  # int8 not asked for
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        export_main([str(tiny_bundle), "--precision", "int8", "--validation", str(tmp_path)])
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    assert export_main([str(bundle), "--precision", "int8", "--calibration", str(tmp_path / "none")]) == 1


def test_quantize_options_reach_the_quantizer(tiny_bundle: Path, tmp_path: Path) -> None:
    """``options``: int8 activations give int8 zero points, ``per_channel`` False one
    weight scale per tensor; the defaults stay uint8 activations and per-channel weights."""
    bundle = load_bundle(tiny_bundle)
    prepared = tmp_path / "prepared.onnx"
    static_int8.prepare(bundle.path(bundle.graph("fp32", "image_encoder").file), prepared)
    images, _ = static_int8.load_crops(_word_set(tmp_path / "w"), limit=4)
    reader = static_int8.CropBatches(static_int8.crop_batches(images, bundle.preprocessing))
    cache = tmp_path / "cache.json"

    def quantized(name: str, options: dict | None) -> onnx.ModelProto:
        static_int8.quantize(prepared, tmp_path / name, "minmax", cache, reader, options=options)
        return onnx.load(str(tmp_path / name))

    def zero_point_types(model: onnx.ModelProto) -> set[int]:
        """The activations' zero points (weights are stored quantized: no QuantizeLinear)."""
        inits = {i.name: i.data_type for i in model.graph.initializer}
        return {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}

    def weight_scale_sizes(model: onnx.ModelProto) -> set[int]:
        return {int(np.prod(i.dims)) for i in model.graph.initializer if i.name.endswith("weight_scale")}

    default = quantized("default.onnx", None)
    assert zero_point_types(default) == {onnx.TensorProto.UINT8} and max(weight_scale_sizes(default)) > 1
    signed = quantized("s8.onnx", {"activations": "int8", "ActivationSymmetric": True})
    assert zero_point_types(signed) == {onnx.TensorProto.INT8}
    assert weight_scale_sizes(quantized("tensor.onnx", {"per_channel": False})) == {1}

    def weights(model: onnx.ModelProto) -> list[np.ndarray]:
        return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                if i.name.endswith("weight_quantized")]

    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights(default)) == 127
    seven = weights(quantized("r7.onnx", {"reduce_range": True}))  # no overflow on CPUs without VNNI
    assert seven and all(w.dtype == np.int8 for w in seven) and max(int(np.abs(w).max()) for w in seven) <= 64
    assert all(w.dtype == np.uint8 for w in weights(quantized("u8.onnx", {"weights": "uint8"})))
    # one named weight in 7 bits keeps its per-channel scales (an override without an axis
    # would make onnxruntime quantize it per tensor)
    first = next(n.input[1] for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")
    assert static_int8.weight_axes(onnx.load(str(prepared)))[first] == 0
    assert static_int8.named_weights(onnx.load(str(prepared)), [static_int8.FIRST_CONV, first]) == [first, first]
    with pytest.raises(static_int8.QuantizeError, match="no weight initializer"):
        static_int8.named_weights(onnx.load(str(prepared)), ["conv1.weigth"])  # a typo would change nothing
    stem = {i.name: onnx.numpy_helper.to_array(i) for i in quantized("stem7.onnx", {"weights_7bit": [first]})
            .graph.initializer}
    assert stem[f"{first}_scale"].size > 1 and int(np.abs(stem[f"{first}_quantized"].astype(np.int32)).max()) <= 64
    others = [v for k, v in stem.items() if k.endswith("weight_quantized") and k != f"{first}_quantized"]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in others) == 127


def test_the_exact_probe_reads_qdq_graphs_unfused(static_bundle: tuple[Path, Path]) -> None:
    """``exact``: the session keeps the QDQ pairs (float math on the int8 grid), and its
    reading of the fp32 graph is the fp32 reading."""
    import onnxruntime as ort

    bundle_dir, words = static_bundle
    bundle = load_bundle(bundle_dir)
    fp32 = bundle.path(bundle.graph("fp32", "image_encoder").file)
    (dev,) = static_int8.dev_sets_from([words])
    fused = static_int8.EncoderProbe(fp32, dev, bundle.preprocessing, bundle.charset, 1)
    exact = static_int8.EncoderProbe(fp32, dev, bundle.preprocessing, bundle.charset, 1, exact=True)
    assert exact.score(fp32)["feature_error"] == 0.0
    assert exact._session(fp32).get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert fused._session(fp32).get_session_options().graph_optimization_level != \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    int8 = bundle.path(bundle.graph("int8", "image_encoder").file)
    assert 0.0 < exact.score(int8)["feature_error"] < 0.5


def test_the_saturation_record(static_bundle: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The validated graph's record says whether this CPU's int8 products saturate."""
    from runtime import backends

    bundle_dir, _ = static_bundle
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    record = manifest["graphs"]["int8"]["image_encoder"]["quantization"]["saturation"]
    assert record == {"cpu_saturates": backends.int8_dot_saturates()}
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    assert static_int8.saturation_record() == {"cpu_saturates": True}


def test_a_second_int8_encoder_for_cpus_without_vnni(static_bundle: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--no-vnni`` writes ``graphs.int8_no_vnni`` beside the int8 graphs, which stay as
    they were; the runtime reads it where int8 products saturate; a CPU where they do not
    is refused (its validation would not show what such CPUs read)."""
    from runtime import backends

    source, words = static_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    before = json.loads((bundle / "manifest.json").read_text())["graphs"]["int8"]
    args = [str(bundle), "--precision", "int8", "--no-vnni", "--calibration", str(words), "--validation",
            str(words), "--calibration-method", "minmax", "--calibration-crops", "12", "--no-sensitivity",
            "--weights-7bit", "first-conv"]
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: False)
    assert export_main(args) == 1
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    assert export_main(args) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["int8"] == before
    entry = manifest["graphs"][backends.INT8_NO_VNNI]["image_encoder"]
    assert entry["file"] == "int8/image_encoder_no_vnni.onnx"
    assert entry["quantization"]["saturation"] == {"cpu_saturates": True}
    (stem,) = entry["quantization"]["weights_7bit"]  # the first convolution's weight, by its name
    assert stem != "first-conv" and stem.endswith("weight")
    loaded = load_bundle(bundle)  # listed in 'files' with its hash
    assert loaded.precisions == ["fp32", "int8"]  # not a precision of its own
    chosen = backends.select_backend(loaded, "ort-cpu", "int8", threads=1)
    assert chosen.specs["image_encoder"].file == entry["file"]
    with Recognizer(loaded, chosen) as recognizer:
        assert all(r.ok for r in recognizer.read(sorted((words / "images").glob("*.png")), batch_size=4))
    assert "image_encoder_no_vnni" in describe_variant(manifest, backends.RECHECKED, backends.INT8_NO_VNNI)["all"]
    with pytest.raises(SystemExit):
        export_main([str(bundle), "--precision", "int8", "--no-vnni", "--calibration", str(words)])


def test_a_statically_quantized_encoder_skips_the_dynamic_pass(tiny_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With --calibration the image encoder is quantized once (statically); the dynamic pass
    still quantizes the text encoder."""
    import export.onnx as export_onnx

    dynamic: list[str] = []
    real = export_onnx.to_int8
    monkeypatch.setattr(export_onnx, "to_int8", lambda src, dst, *a, **k: (dynamic.append(Path(dst).stem),
                                                                           real(src, dst, *a, **k))[1])
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    add_precisions(bundle, ["int8"], static=StaticInt8(str(_word_set(tmp_path / "words")), [], method="minmax",
                                                       crops=6, sensitivity=False, threads=1))
    assert "image_encoder" not in dynamic and "text_encoder" in dynamic
    assert load_bundle(bundle).graph("int8", "image_encoder").file == "int8/image_encoder.onnx"
