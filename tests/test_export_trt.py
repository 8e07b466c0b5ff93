"""export.trt without a GPU: engine naming, the manifest update with a fake builder, the
builder against fakes of TensorRT 10 and 11 (strong typing, no precision settings), the
no-GPU exit code before any work, one-line messages for missing extras; the real TensorRT
build runs only where a GPU and tensorrt exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from export import trt as export_trt
from export.trt import (
    EXIT_NO_TENSORRT,
    BuildSettings,
    TensorRTUnavailable,
    build_engines,
    detect,
    engine_file,
    main,
    tensorrt_builder,
)
from runtime import backends
from runtime.bundle import load_bundle, sha256_file
from runtime.gpu import GpuProbe

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


def test_no_engine_is_built_for_a_specialist(bundle: Path) -> None:
    from runtime.specialist import GRAPH_NAME

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["graphs"]["fp32"][GRAPH_NAME] = manifest["graphs"]["fp32"]["image_encoder"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    fake = FakeBuilder()
    built = build_engines(bundle, ["fp32"], BuildSettings(), builder=fake, compute_capability="8.9",
                          version="10.3.0", log=lambda m: None)
    assert GRAPH_NAME not in {e["graph"] for e in built} and len(built) == 4


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
    assert "no TensorRT engines built" in done.stderr and "Nothing was changed" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()  # checked before copying anything
    assert load_bundle(bundle).engines == []


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


# -- issue 13 ------------------------------------------------------------------------------------

NO_GPU = GpuProbe(None, "no CUDA device (cudaErrorNoDevice)", absent=True)
NO_TRT = (None, "tensorrt is not installed (pip install 'clipllama[trt]')")


def test_detect_names_the_gpu_first() -> None:
    """Point 9: without a GPU and without tensorrt the GPU is named first (it used to say
    only "tensorrt is not installed")."""
    with pytest.raises(TensorRTUnavailable) as caught:
        detect(NO_GPU, NO_TRT)
    message = str(caught.value)
    assert message.startswith("no usable NVIDIA GPU (no CUDA device")
    assert message.index("GPU") < message.index("tensorrt is not installed") and "clipllama[trt]" in message
    with pytest.raises(TensorRTUnavailable, match=r"^tensorrt is not installed"):
        detect(GpuProbe("9.0"), NO_TRT)
    assert detect(GpuProbe("9.0"), ("11.4.0.106", None)) == ("9.0", "11.4.0.106")


def test_no_gpu_is_found_before_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Point 9: a checkpoint is not exported (86 s for the default) when no engine can be built."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.json").write_text("{}")
    exported = []
    import export.onnx

    monkeypatch.setattr(export.onnx, "export_bundle", lambda *a, **k: exported.append(a))
    monkeypatch.setattr(backends, "gpu_status", lambda device=0: NO_GPU)
    monkeypatch.setattr(export_trt, "tensorrt_status", lambda: NO_TRT)
    assert main([str(ckpt), "-o", str(tmp_path / "out"), "--fp16"]) == EXIT_NO_TENSORRT
    err = capsys.readouterr().err
    assert exported == [] and not (tmp_path / "out").exists()
    assert "no usable NVIDIA GPU" in err and len(err.strip().splitlines()) == 1


def test_missing_export_extra_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Point 8: exporting a checkpoint without the export extra: one line naming it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.json").write_text("{}")
    monkeypatch.setattr(export_trt, "detect", lambda: ("9.0", "10.16.1.11"))
    monkeypatch.setitem(sys.modules, "export.onnx", None)
    assert main([str(ckpt), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clipllama[export]" in err and "export.onnx" in err


def test_runtime_only_install_gets_help_and_one_line(bundle: Path) -> None:
    """Point 8: with neither onnx nor torch (the quick start's runtime-only install),
    ``--help`` works and a run ends in one line, never a traceback."""
    code = ("import sys; sys.modules['onnx'] = sys.modules['torch'] = None\n"
            "from export.trt import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"sys.exit(main([{str(bundle)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert "usage:" in done.stdout and "Traceback" not in done.stderr, done.stderr
    if done.returncode == EXIT_NO_TENSORRT:  # this machine: no GPU or no tensorrt
        assert len(done.stderr.strip().splitlines()) == 1 and "no TensorRT engines built" in done.stderr
    else:  # a GPU machine with tensorrt: engines from the bundle's fp32 graphs, onnx not needed
        assert done.returncode == 0, done.stderr


class _Layer:
    """A network layer that records every setting made on it."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "settings", [])
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value) -> None:
        self.settings.append(key)

    def set_output_type(self, index, dtype) -> None:
        self.settings.append("output_type")


def _fake_trt(version: str, calls: list) -> types.SimpleNamespace:
    """tensorrt's builder API as TensorRT 10 or 11 has it, recording what the builder does."""
    network = types.SimpleNamespace(num_inputs=1, layers=[_Layer("layernorm"), _Layer("softmax")],
                                    get_input=lambda i: types.SimpleNamespace(name="images"))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, *shapes):
            self.shapes[name] = shapes

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, net, config):
            return b"engine"

    class Parser:
        num_errors = 0

        def __init__(self, net, logger) -> None:
            pass

        def parse_from_file(self, path):
            return True

    flags = types.SimpleNamespace(TF32="TF32", FP16="FP16", INT8="INT8")
    if version.startswith("11"):  # FP16/INT8 removed, STRONGLY_TYPED deprecated and ignored
        flags = types.SimpleNamespace(TF32="TF32")
    creation = types.SimpleNamespace(STRONGLY_TYPED=0)
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return types.SimpleNamespace(
        __version__=version, Logger=logger, Builder=Builder, OnnxParser=Parser, BuilderFlag=flags,
        NetworkDefinitionCreationFlag=creation, MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        network=network)


@pytest.mark.parametrize(("version", "flags"), [("10.16.1.11", 1), ("11.4.0.106", 0)])
def test_builder_is_strongly_typed_with_no_precision_settings(tmp_path: Path, version: str, flags: int) -> None:
    """Points 5 and 6: a strongly typed network (the flag on TensorRT 10, nothing on 11, where
    it is deprecated), no precision builder flag, TF32 off, no per-layer precision: the fp16
    graphs' FP32 islands stay FP32."""
    calls: list = []
    trt = _fake_trt(version, calls)
    onnx_file = tmp_path / "g.onnx"
    onnx_file.write_bytes(b"onnx")
    tensorrt_builder(onnx_file, tmp_path / "g.engine", {"images": ["batch", 3, 48, "width"]},
                     BuildSettings(max_batch=16, axes=(("width", (8, 160, 320)),)), tmp_path / "cache", trt=trt)
    assert calls[0] == ("create_network", flags)
    assert not any(c[0] == "set_flag" for c in calls)
    assert ("clear_flag", "TF32") in calls
    assert all(layer.settings == [] for layer in trt.network.layers)
    profile = next(c[1] for c in calls if c[0] == "profile")
    assert profile["images"] == ((1, 3, 48, 8), (8, 3, 48, 160), (16, 3, 48, 320))
    assert (tmp_path / "g.engine").read_bytes() == b"engine" and (tmp_path / "cache").read_bytes() == b"cache"
