"""export.trt without a GPU: engine naming, the manifest update with a fake builder, the
no-GPU exit code; the real TensorRT build runs only where a GPU and tensorrt exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.trt import (
    EXIT_NO_TENSORRT,
    BuildSettings,
    TensorRTUnavailable,
    build_engines,
    detect,
    engine_file,
    main,
)
from runtime.bundle import load_bundle, sha256_file

REPO = Path(__file__).resolve().parents[1]


def _have_tensorrt() -> bool:
    try:
        detect()
    except TensorRTUnavailable:
        return False
    return True


class FakeBuilder:
    """Writes a stand-in engine and records what it was asked to build."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, BuildSettings]] = []

    def __call__(self, onnx_path: Path, engine_path: Path, shapes: dict, settings: BuildSettings,
                 cache: Path) -> None:
        assert onnx_path.is_file()
        self.calls.append((onnx_path.name, shapes, settings))
        engine_path.write_bytes(b"engine:" + onnx_path.read_bytes()[:64])
        cache.write_bytes(b"cache")


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_engine_names_record_gpu_and_tensorrt_version() -> None:
    assert engine_file("image_encoder", "fp16", "8.9", "10.3.0") == "trt/image_encoder.fp16.sm89.trt10.3.0.engine"
    assert engine_file("cross_decoder", "fp32", "12.0", "11.4.0.106") == \
        "trt/cross_decoder.fp32.sm120.trt11.4.0.106.engine"


def test_build_settings_are_checked() -> None:
    assert BuildSettings().opt_batch == 8 and BuildSettings().max_batch == 64
    with pytest.raises(ValueError):
        BuildSettings(min_batch=1, opt_batch=16, max_batch=8)


def test_fake_build_updates_the_manifest(bundle: Path) -> None:
    fake = FakeBuilder()
    built = build_engines(bundle, ["fp32"], BuildSettings(max_batch=16), builder=fake,
                          compute_capability="8.9", version="10.3.0", log=lambda m: None)
    assert [c[0] for c in fake.calls] == ["image_encoder.onnx", "visual_decoder.onnx", "text_encoder.onnx",
                                          "cross_decoder.onnx"]
    assert fake.calls[2][1] == {"text_ids": ["batch", 16]}
    assert {e["graph"] for e in built} == {"image_encoder", "visual_decoder", "text_encoder", "cross_decoder"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engines"] == built
    for entry in built:
        assert entry["file"] in manifest["files"]
        assert manifest["files"][entry["file"]] == sha256_file(bundle / entry["file"])
        assert (entry["min_batch"], entry["opt_batch"], entry["max_batch"]) == (1, 8, 16)
    assert "trt/timing.sm89.trt10.3.0.cache" in manifest["files"]
    loaded = load_bundle(bundle)  # the runtime reads the engines section
    assert len(loaded.engines) == 4 and loaded.engines[0].compute_capability == "8.9"

    # a rebuild for the same GPU and version replaces the entries; another GPU adds its own
    build_engines(bundle, ["fp32"], BuildSettings(), builder=fake, compute_capability="8.9", version="10.3.0",
                  log=lambda m: None)
    build_engines(bundle, ["fp32"], BuildSettings(), builder=fake, compute_capability="9.0", version="10.3.0",
                  log=lambda m: None)
    engines = json.loads((bundle / "manifest.json").read_text())["engines"]
    assert len(engines) == 8
    assert sorted({e["compute_capability"] for e in engines}) == ["8.9", "9.0"]
    load_bundle(bundle)


def test_fp16_engines_are_built_from_the_fp16_graphs(bundle: Path) -> None:
    fake = FakeBuilder()
    built = build_engines(bundle, ["fp16"], BuildSettings(), builder=fake, compute_capability="8.9",
                          version="10.3.0", log=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "fp16" in manifest["graphs"]  # derived from fp32 first
    assert all(e["precision"] == "fp16" and ".fp16.sm89." in e["file"] for e in built)
    load_bundle(bundle)


@pytest.mark.skipif(_have_tensorrt(), reason="a GPU with TensorRT is present: the no-GPU path cannot be shown")
def test_without_gpu_exits_with_the_documented_code(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "export.trt", str(bundle), "-o", str(out), "--fp16"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_NO_TENSORRT == 3, done.stderr
    assert "no TensorRT engines built" in done.stderr and "complete" in done.stderr
    assert load_bundle(out).engines == []  # the ONNX bundle is left usable


def test_bad_source_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    assert "neither a bundle" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not _have_tensorrt(), reason="needs an NVIDIA GPU and the tensorrt package")
def test_real_tensorrt_build(bundle: Path) -> None:  # pragma: no cover - GPU machines only
    built = build_engines(bundle, ["fp16"], BuildSettings(max_batch=4, opt_batch=2))
    assert all((bundle / e["file"]).stat().st_size > 0 for e in built)
    from runtime.recognizer import Recognizer

    with Recognizer.from_bundle(bundle, backend="trt", llm="none", precision="fp16") as recognizer:
        from PIL import Image

        assert recognizer.read([Image.new("RGB", (100, 32), "white")])[0].ok
