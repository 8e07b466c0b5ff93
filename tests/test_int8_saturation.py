"""x86 CPUs without VNNI saturate onnxruntime's uint8 x int8 products: an int8 graph with
8-bit weights then reads worse than where it was chosen, so ``--precision auto`` reads fp32
there and an explicit ``--precision int8`` is warned (``runtime.backends``)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from runtime import backends
from runtime.backends import RECHECKED, WEIGHTS_7BIT, int8_saturation_problem, select_backend
from runtime.bundle import DEFAULT_BUNDLE, load_bundle


def _static(bundle, weights: str):
    """A copy of ``bundle`` whose int8 image encoder record names ``weights`` (validated
    where int8 products do not saturate) and which has no int8 graph for CPUs without VNNI."""
    bundle = copy.deepcopy(bundle)
    bundle.manifest["graphs"].pop(backends.INT8_NO_VNNI, None)
    bundle.graphs.pop(backends.INT8_NO_VNNI, None)
    record = bundle.manifest["graphs"]["int8"]["image_encoder"].setdefault("quantization", {"mode": "static"})
    record["weights"] = weights
    record["saturation"] = {"cpu_saturates": False}
    return bundle


@pytest.fixture()
def embedded():
    return load_bundle(DEFAULT_BUNDLE)


def test_the_probe_graph_is_a_saturating_product() -> None:
    """The embedded probe is uint8 [1, 64] x int8 127 [64, 1]: 255 * 127 * 64 when exact."""
    model = onnx.load_from_string(base64.b64decode(backends.INT8_PROBE_ONNX))
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "MatMulInteger"
    (weights,) = model.graph.initializer
    values = numpy_helper.to_array(weights)
    assert values.dtype == np.int8 and values.shape == (64, 1) and (values == 127).all()
    assert isinstance(backends.int8_dot_saturates(), bool)


def test_the_probe_agrees_with_the_cpu_flags() -> None:
    """Linux x86: saturation exactly where the CPU has AVX2 but neither AVX-512 VNNI nor AVX-VNNI."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags (not Linux x86): nothing to compare the probe with")
    if "avx2" not in flags:
        pytest.skip("a CPU without AVX2: onnxruntime's kernel choice there is not pinned down here")
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    assert backends.int8_dot_saturates() is (not vnni)


@pytest.mark.parametrize(("weights", "saturates", "problem"), [
    ("int8 per channel", True, True),
    ("int8 per channel", False, False),
    (WEIGHTS_7BIT, True, False),
])
def test_only_8bit_weights_on_a_saturating_cpu_are_a_problem(embedded, monkeypatch, weights, saturates,
                                                            problem) -> None:
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: saturates)
    found = int8_saturation_problem(_static(embedded, weights))
    assert (found is not None) == problem
    if problem:
        assert "VNNI" in found and "--no-vnni" in found


@pytest.mark.parametrize(("measured_saturating", "problem"), [(True, False), (False, True)])
def test_figures_measured_with_saturating_kernels_are_believed(embedded, monkeypatch, measured_saturating,
                                                                problem) -> None:
    """8-bit weights whose export validated them on a CPU that saturates
    (``quantization.saturation.cpu_saturates``) run on such CPUs too."""
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    bundle = _static(embedded, "int8 per channel")
    bundle.manifest["graphs"]["int8"]["image_encoder"]["quantization"]["saturation"] = {
        "cpu_saturates": measured_saturating}
    assert (int8_saturation_problem(bundle) is not None) == problem


def test_dynamic_int8_graphs_are_not_judged(embedded, monkeypatch) -> None:
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    bundle = copy.deepcopy(embedded)
    bundle.manifest["graphs"]["int8"]["image_encoder"].pop("quantization", None)
    assert int8_saturation_problem(bundle) is None


def test_auto_reads_fp32_where_int8_would_saturate(embedded, monkeypatch) -> None:
    embedded.manifest.setdefault("defaults", {})["cpu_precision"] = RECHECKED
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    notes: list[str] = []
    assert backends.cpu_precision(_static(embedded, "int8 per channel"), notes) == "fp32"
    assert len(notes) == 1 and "VNNI" in notes[0]
    assert backends.cpu_precision(_static(embedded, WEIGHTS_7BIT)) == RECHECKED
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: False)
    assert backends.cpu_precision(_static(embedded, "int8 per channel")) == RECHECKED


def test_an_explicit_int8_request_runs_and_is_warned(embedded, monkeypatch) -> None:
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    chosen = select_backend(_static(embedded, "int8 per channel"), "ort-cpu", "int8", threads=1)
    try:
        assert chosen.precision == "int8"
        assert len(chosen.warnings) == 1 and "--precision int8" in chosen.warnings[0]
    finally:
        chosen.close()
    chosen = select_backend(_static(embedded, WEIGHTS_7BIT), "ort-cpu", "int8", threads=1)
    try:
        assert chosen.warnings == []
    finally:
        chosen.close()


@pytest.fixture()
def eight_bit_only(tmp_path) -> Path:
    """The embedded bundle without its int8 graph for CPUs without VNNI (files and all)."""
    root = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, root)
    manifest = json.loads((root / "manifest.json").read_text())
    rel = manifest["graphs"].pop(backends.INT8_NO_VNNI)["image_encoder"]["file"]
    del manifest["files"][rel]
    manifest["defaults"].pop(backends.RECHECK_KEYS[backends.INT8_NO_VNNI])
    (root / rel).unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_the_cli_warns_and_auto_reads_fp32(eight_bit_only, monkeypatch, capsys) -> None:
    """``clipllama-run`` on a CPU that saturates, with a bundle whose only int8 image encoder
    has 8-bit weights: ``--precision int8`` prints one warning line; the default reads fp32
    and says why in ``--json``'s backend notes."""
    from runtime import cli

    sample = sorted((Path(DEFAULT_BUNDLE).parent / "samples").glob("*.png"))[0]
    base = ["--engine", str(eight_bit_only), "--llm", "none", "--threads", "1"]
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    assert cli.main([*base, "--precision", "int8", str(sample)]) == 0
    err = capsys.readouterr().err
    assert sum(line.startswith("warning: --precision int8 reads worse") for line in err.splitlines()) == 1
    assert cli.main([*base, "--json", str(sample)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0])["backend"] == "ort-cpu fp32"
    assert "reading in fp32, not the bundle's int8+fp32" in captured.err
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: False)
    assert cli.main([*base, "--precision", "int8", str(sample)]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_the_embedded_bundle_reads_int8_everywhere(monkeypatch, capsys) -> None:
    """The embedded bundle carries an int8 image encoder for CPUs without VNNI: on such a CPU
    the default stays int8+fp32 with that graph, and nothing is warned."""
    from runtime import cli

    sample = sorted((Path(DEFAULT_BUNDLE).parent / "samples").glob("*.png"))[0]
    for saturates in (True, False):
        monkeypatch.setattr(backends, "int8_dot_saturates", lambda saturates=saturates: saturates)
        assert cli.main(["--llm", "none", "--threads", "1", "--json", str(sample)]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out.splitlines()[0])["backend"] == f"ort-cpu {RECHECKED}"
        assert "warning:" not in captured.err
        assert ("image_encoder_no_vnni" in captured.err) is saturates


def test_serving_options_carry_the_same_warning(eight_bit_only, embedded, monkeypatch) -> None:
    from runtime.options import RecognizerConfig

    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    config = RecognizerConfig(engine=str(eight_bit_only), precision="int8+fp32", llm="none")
    assert len(config.warnings(config.check())) == 1
    assert RecognizerConfig(precision="fp32", llm="none").warnings(embedded) == []
    # it has a graph for this CPU
    assert RecognizerConfig(precision="int8+fp32", llm="none").warnings(embedded) == []


def _with_no_vnni_graph(bundle, threshold: float | None = 0.5):
    """A copy of ``bundle`` with an int8 image encoder for CPUs without VNNI (here the int8
    one's file, validated where products saturate) and, unless None, its own threshold."""
    bundle = _static(bundle, "int8 per channel")
    entry = copy.deepcopy(bundle.manifest["graphs"]["int8"]["image_encoder"])
    entry["quantization"]["saturation"] = {"cpu_saturates": True}
    bundle.manifest["graphs"][backends.INT8_NO_VNNI] = {"image_encoder": entry}
    bundle.graphs[backends.INT8_NO_VNNI] = {
        "image_encoder": dataclasses.replace(bundle.graph("int8", "image_encoder"), precision=backends.INT8_NO_VNNI)}
    defaults = bundle.manifest.setdefault("defaults", {})
    defaults["cpu_precision"] = RECHECKED
    defaults["int8_recheck"] = {"below_confidence": 0.9}
    defaults.pop("int8_no_vnni_recheck", None)
    if threshold is not None:
        defaults["int8_no_vnni_recheck"] = {"below_confidence": threshold}
    return bundle


@pytest.mark.parametrize("saturates", [True, False])
def test_cpus_without_vnni_read_their_own_int8_graph(embedded, monkeypatch, saturates) -> None:
    """Where products saturate and the bundle has a graph made for that, it is read, with its
    own int8+fp32 threshold, nothing is warned and auto keeps int8+fp32; elsewhere the int8 one."""
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: saturates)
    bundle = _with_no_vnni_graph(embedded)
    variant = backends.INT8_NO_VNNI if saturates else "int8"
    assert backends.int8_variant(bundle) == variant
    assert int8_saturation_problem(bundle) is None
    assert backends.recheck_threshold(bundle) == (0.5 if saturates else 0.9)
    notes: list[str] = []
    assert backends.cpu_precision(bundle, notes) == RECHECKED and notes == []
    for precision in ("int8", RECHECKED):
        chosen = select_backend(bundle, "ort-cpu", precision, threads=1)
        try:
            fast = chosen.fast if precision == RECHECKED else chosen
            assert fast.specs["image_encoder"].precision == variant
            assert chosen.warnings == []
            assert any("no VNNI" in n for n in chosen.notes) is saturates
            if precision == RECHECKED:
                assert chosen.below_confidence == (0.5 if saturates else 0.9)
        finally:
            chosen.close()


def test_a_no_vnni_graph_without_its_threshold_reads_fp32_and_says_why(embedded, monkeypatch) -> None:
    monkeypatch.setattr(backends, "int8_dot_saturates", lambda: True)
    bundle = _with_no_vnni_graph(embedded, threshold=None)
    notes: list[str] = []
    assert backends.cpu_precision(bundle, notes) == "fp32"
    assert len(notes) == 1 and "int8_no_vnni_recheck" in notes[0]
    with pytest.raises(backends.BundleError, match="int8_no_vnni_recheck"):
        backends.recheck_threshold(bundle)
