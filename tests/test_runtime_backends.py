"""Backends: engine matching, selection and fallbacks (with the reason for each, issue 13),
onnxruntime sessions and provider options, and the TensorRT backend's buffer plumbing
against fake ``tensorrt``/``cuda`` modules of TensorRT 10 and 11 (no GPU here)."""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import write_manifest

from runtime import backends
from runtime.backends import (
    BackendError,
    OrtBackend,
    TensorRTBackend,
    engine_mismatch,
    matching_engines,
    normalize_cc,
    same_trt_version,
    select_backend,
)
from runtime.bundle import GRAPH_NAMES, BundleError, EngineSpec, load_bundle
from runtime.gpu import GpuProbe

NO_GPU = GpuProbe(None, "no CUDA device (cudaErrorNoDevice)", absent=True)


def _machine(monkeypatch: pytest.MonkeyPatch, gpu: GpuProbe | str = NO_GPU, trt: str | None = "10.3.0.26",
             trt_reason: str | None = None) -> None:
    """Pretend this machine has ``gpu`` (a probe or a compute capability) and TensorRT ``trt``."""
    probe = GpuProbe(gpu) if isinstance(gpu, str) else gpu
    monkeypatch.setattr(backends, "gpu_status", lambda device=0: probe)
    reason = trt_reason or (None if trt else "tensorrt is not installed (pip install 'clipllama[trt]')")
    monkeypatch.setattr(backends, "tensorrt_status", lambda: (trt, reason))


def _engine(graph: str = "image_encoder", cc: str = "8.9", version: str = "10.3.0", max_batch: int = 4,
            precision: str = "fp16") -> dict:
    return {"graph": graph, "precision": precision, "file": f"trt/{graph}.{precision}.engine",
            "compute_capability": cc, "tensorrt_version": version, "min_batch": 1, "opt_batch": 2,
            "max_batch": max_batch}


def _with_engines(root: Path, engines: list[dict], precision: str = "fp16") -> Path:
    """Add engine files (stand-ins) and an fp16 graph set to the fake bundle's manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "trt").mkdir(exist_ok=True)
    for e in engines:
        (root / e["file"]).write_bytes(f"engine {e['graph']}".encode())
    manifest["engines"] = engines
    manifest["graphs"][precision] = manifest["graphs"]["fp32"]
    write_manifest(root, manifest, list(manifest["files"]) + [e["file"] for e in engines])
    return root


def test_version_and_capability_helpers() -> None:
    assert normalize_cc("8.9") == normalize_cc("89") == normalize_cc("sm89") == normalize_cc("sm_89") == "8.9"
    assert normalize_cc("120") == "12.0"
    assert same_trt_version("10.3.0.26", "10.3.0") and not same_trt_version("10.3.0", "10.4.0")
    spec = EngineSpec("image_encoder", "fp16", "x", "8.9", "10.3.0", 1, 2, 4)
    assert engine_mismatch(spec, "8.9", "10.3.0.26") is None
    assert "compute capability 8.9" in engine_mismatch(spec, "9.0", "10.3.0")
    assert "TensorRT 10.3.0" in engine_mismatch(spec, "8.9", "10.5.0")
    assert engine_mismatch(spec, None, "10.3.0") == "no CUDA GPU"
    assert "not installed" in engine_mismatch(spec, "8.9", None)


def test_matching_engines_warns_about_other_gpus(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engines = [_engine(g) for g in GRAPH_NAMES[:3]] + [_engine("cross_decoder", cc="9.0")]
    bundle = load_bundle(_with_engines(fake_bundle, engines))
    _machine(monkeypatch, "8.9", "10.3.0.26")
    with pytest.warns(RuntimeWarning, match=r"cross_decoder\.fp16\.engine not usable here .*9\.0"):
        found = matching_engines(bundle, "fp16")
    assert sorted(found) == sorted(GRAPH_NAMES[:3])
    assert matching_engines(bundle, "fp32") == {}
    _machine(monkeypatch, "8.9", "10.4.0")
    with pytest.warns(RuntimeWarning) as caught:
        assert matching_engines(bundle, "fp16") == {}
    # one line per reason: the three engines of another TensorRT, the one of another GPU
    assert len(caught) == 2
    assert sum(str(w.message).count(".engine") for w in caught if "built with TensorRT 10.3.0" in str(w.message)) == 3


def test_select_backend_errors(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(fake_bundle)
    with pytest.raises(BackendError, match="unknown backend"):
        select_backend(bundle, "magic")
    with pytest.raises(BundleError, match="no int8 variant"):
        select_backend(bundle, "ort-cpu", "int8")
    _machine(monkeypatch, NO_GPU, None)
    with pytest.raises(BackendError, match="no usable fp32 TensorRT engine") as caught:
        select_backend(bundle, "trt", "fp32")
    # issue 13 point 12: the reasons in words, not "(GPU None, TensorRT None)"
    message = str(caught.value)
    assert "None" not in message and "cudaErrorNoDevice" in message and "clipllama[trt]" in message
    assert "python -m export.trt" in message
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
            select_backend(bundle, "ort-cuda", "fp32")


def test_default_precision(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(_with_engines(fake_bundle, []))
    _machine(monkeypatch, NO_GPU)
    assert backends.default_precision(bundle, "auto") == "fp32"
    assert backends.default_precision(bundle, "ort-cpu") == "fp32"
    assert backends.default_precision(bundle, "ort-cuda") == "fp16"
    _machine(monkeypatch, "8.9")
    monkeypatch.setattr(backends, "_ort_gpu_available", lambda: True)
    assert backends.default_precision(bundle, "auto") == "fp16"
    # a GPU but only onnxruntime's CPU provider and no engine: fp32
    monkeypatch.setattr(backends, "_ort_gpu_available", lambda: False)
    assert backends.default_precision(bundle, "auto") == "fp32"


def test_cpu_precision_comes_from_the_manifest(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision auto`` on a CPU: the manifest's defaults.cpu_precision when the bundle has
    that variant, fp32 otherwise (older bundles have no defaults); a GPU still gets fp16."""
    bundle = load_bundle(_with_engines(fake_bundle, []))
    _machine(monkeypatch, NO_GPU)
    assert backends.cpu_precision(bundle) == "fp32"
    bundle.graphs["int8"] = dict(bundle.graphs["fp32"])
    bundle.manifest["defaults"] = {"cpu_precision": "int8"}
    assert backends.default_precision(bundle, "auto") == "int8"
    assert backends.default_precision(bundle, "ort-cpu") == "int8"
    assert backends.default_precision(bundle, "ort-cuda") == "fp16"
    bundle.manifest["defaults"] = {"cpu_precision": "bf16"}  # a variant it does not have
    assert backends.default_precision(bundle, "auto") == "fp32"
    with pytest.raises(BackendError, match="unknown precision 'fp8'"):
        select_backend(bundle, "ort-cpu", "fp8")


# -- onnxruntime ------------------------------------------------------------------------------


def _tiny_onnx(path: Path, dtype: str) -> None:
    """images -> image_features = images * 2, in ``dtype``."""
    onnx = pytest.importorskip("onnx", reason="onnx is needed to write a test graph")
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    two = helper.make_tensor("two", elem, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "two"], ["image_features"])], "double",
        [helper.make_tensor_value_info("images", elem, ["batch", 3])],
        [helper.make_tensor_value_info("image_features", elem, ["batch", 3])], [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ort_backend_casts_inputs_and_returns_float32(fake_bundle: Path, dtype: str) -> None:
    _tiny_onnx(fake_bundle / "fp32" / "image_encoder.onnx", dtype)
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    spec = manifest["graphs"]["fp32"]["image_encoder"]
    spec["inputs"][0].update(shape=["batch", 3], dtype=dtype)
    spec["outputs"][0].update(shape=["batch", 3], dtype=dtype)
    write_manifest(fake_bundle, manifest, list(manifest["files"]))
    backend = OrtBackend(load_bundle(fake_bundle), "fp32", threads=1, graphs=("image_encoder",))
    assert backend.name == "ort-cpu" and backend.precision == "fp32"
    out = backend.run("image_encoder", {"images": np.arange(6, dtype=np.float64).reshape(2, 3)})
    assert out["image_features"].dtype == np.float32
    np.testing.assert_allclose(out["image_features"], np.arange(6).reshape(2, 3) * 2.0)
    with pytest.raises(BackendError, match="missing input 'images'"):
        backend.run("image_encoder", {"other": np.zeros((1, 3))})
    backend.close()


def test_ort_backend_refuses_a_broken_graph(fake_bundle: Path) -> None:
    with pytest.raises(BackendError, match="onnxruntime cannot load it"):
        OrtBackend(load_bundle(fake_bundle), "fp32", threads=1, graphs=("image_encoder",))


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPLLAMA_THREADS", "3")
    assert backends.default_threads() == 3
    monkeypatch.setenv("CLIPLLAMA_THREADS", " 2 ")
    assert backends.default_threads() == 2
    monkeypatch.delenv("CLIPLLAMA_THREADS")
    assert 1 <= backends.default_threads() <= 8
    monkeypatch.setenv("CLIPLLAMA_THREADS", "")  # set but empty: the default
    assert 1 <= backends.default_threads() <= 8


@pytest.mark.parametrize("value", ["abc", "1.5", "0", "-2"])
def test_bad_threads_variable_is_one_error_naming_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CLIPLLAMA_THREADS", value)
    with pytest.raises(BackendError, match=f"CLIPLLAMA_THREADS={value!r}|CLIPLLAMA_THREADS={value}:") as info:
        backends.default_threads()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["abc", "0"])
def test_cli_refuses_a_bad_threads_variable_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys, value: str) -> None:
    """Like ``--threads 0``: exit 2 and one line that names the variable (the embedded bundle)."""
    from runtime import cli

    sample = Path(cli.__file__).parent / "assets" / "samples" / "hello.png"
    monkeypatch.setenv("CLIPLLAMA_THREADS", value)
    assert cli.main([str(sample), "--llm", "none", "--backend", "ort-cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CLIPLLAMA_THREADS" in lines[0], lines


def test_zero_threads_are_refused_by_the_backend(fake_bundle: Path) -> None:
    with pytest.raises(BackendError, match="at least 1"):
        OrtBackend(load_bundle(fake_bundle), "fp32", threads=0, graphs=())


def test_sessions_do_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's sessions run one after another: their pools must not spin between runs."""
    monkeypatch.delenv("CLIPLLAMA_THREADS", raising=False)
    options = backends.session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == backends.default_threads()
    assert backends.session_options(1).intra_op_num_threads == 1


# -- TensorRT plumbing with fakes -------------------------------------------------------------


class _FakeCudart:
    """Host memory standing in for device memory, with cuda-python's (error, value) returns."""

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.blocks: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []
        self.synced = 0

    def cudaMalloc(self, n: int):  # noqa: N802
        block = ctypes.create_string_buffer(n)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaFree(self, ptr: int):  # noqa: N802
        self.freed.append(ptr)
        del self.blocks[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 77

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.synced += 1
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)


def _fake_tensorrt(cudart: _FakeCudart, log: list) -> types.ModuleType:
    """A tensorrt module whose engines compute ``out = in * 2 + 1`` on float32 (B, 3)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class Logger:
        WARNING = 2

        def __init__(self, level) -> None:
            pass

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes[self.engine.input]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert type(stream) is int and stream == 77, stream  # the native handle
            shape = self.shapes[self.engine.input]
            log.append(shape[0])
            n = int(np.prod(shape))
            src = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[self.engine.input]))
            dst = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses[self.engine.output]))
            dst[:] = src * 2 + 1
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, blob: bytes) -> None:
            self.input, self.output = json.loads(blob)

        def get_tensor_name(self, i):
            return [self.input, self.output][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == self.input else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine(blob) if blob.startswith(b"[") else None

    trt.TensorIOMode, trt.Logger, trt.Runtime = TensorIOMode, Logger, Runtime
    trt.nptype = lambda dtype: np.float32
    return trt


def test_tensorrt_backend_plumbing_with_fakes(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engines = [_engine("image_encoder", max_batch=4, precision="fp32")]
    root = _with_engines(fake_bundle, engines, "fp32")
    (root / engines[0]["file"]).write_text(json.dumps(["images", "image_features"]))
    manifest = json.loads((root / "manifest.json").read_text())
    write_manifest(root, manifest, list(manifest["files"]))
    cudart, log = _FakeCudart(), []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(cudart, log))
    monkeypatch.setattr(backends, "_cudart", lambda: cudart)
    bundle = load_bundle(root)
    backend = TensorRTBackend(bundle, {"image_encoder": bundle.engines[0]})
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    out = backend.run("image_encoder", {"images": x})["image_features"]
    np.testing.assert_allclose(out, x * 2 + 1)
    assert log == [4, 4, 2]  # split at the engine's max batch
    assert cudart.synced == 3
    small = backend.run("image_encoder", {"images": x[:1]})["image_features"]
    np.testing.assert_allclose(small, x[:1] * 2 + 1)
    allocated = len(cudart.blocks)
    backend.close()
    assert len(cudart.freed) == allocated and not cudart.blocks


def test_undeserializable_engine_is_an_error(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _with_engines(fake_bundle, [_engine("image_encoder", precision="fp32")], "fp32")
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(cudart, []))
    monkeypatch.setattr(backends, "_cudart", lambda: cudart)
    bundle = load_bundle(root)
    with pytest.raises(BackendError, match="could not deserialize"):
        TensorRTBackend(bundle, {"image_encoder": bundle.engines[0]})


def test_auto_falls_back_to_onnx_for_foreign_engines(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines for another GPU: onnxruntime instead, and a note that says why."""
    root = _with_engines(fake_bundle, [_engine(g, cc="7.5", precision="fp32") for g in GRAPH_NAMES], "fp32")
    bundle = load_bundle(_loadable(root))
    _machine(monkeypatch, "8.9", "10.3.0")
    backend = select_backend(bundle, "auto", "fp32", threads=1)
    assert backend.name == "ort-cpu"
    assert any("compute capability 7.5, this GPU is 8.9" in n and "using the ONNX graphs" in n for n in backend.notes)
    assert sum(".engine" in n for n in backend.notes) == 1  # one line for the four engines
    backend.close()


@pytest.mark.gpu
def test_gpu_backends_on_the_tiny_bundle(request: pytest.FixtureRequest) -> None:
    if backends.gpu_compute_capability() is None:
        pytest.skip("no CUDA GPU on this machine (the TensorRT and CUDA backends need one)")
    tiny_bundle = request.getfixturevalue("tiny_bundle")
    from runtime.recognizer import Recognizer

    images = [np.full((32, 128, 3), v, np.uint8) for v in (0, 128, 255)]
    cpu = Recognizer.from_bundle(tiny_bundle, backend="ort-cpu", llm="none").read(images)
    gpu = Recognizer.from_bundle(tiny_bundle, backend="auto", llm="none", precision="fp32").read(images)
    assert [r.text for r in gpu] == [r.text for r in cpu]


# -- issue 13: what runs, and why not something faster ---------------------------------------


def _loadable(root: Path) -> Path:
    """Give every fp32 graph of a fake bundle a real (tiny) ONNX file, so sessions load."""
    manifest = json.loads((root / "manifest.json").read_text())
    for spec in manifest["graphs"]["fp32"].values():
        _tiny_onnx(root / spec["file"], "float32")
    write_manifest(root, manifest, list(manifest["files"]))
    return root


class _SessionRecorder:
    """Stands in for ``onnxruntime.InferenceSession``: a real CPU session, the providers and
    options it was asked for recorded, and the providers ``started`` reported as running."""

    def __init__(self, started: list[str]) -> None:
        import onnxruntime

        self.started, self.calls, self.real = started, [], onnxruntime.InferenceSession

    def __call__(self, path, sess_options=None, providers=None, disabled_optimizers=None):
        self.calls.append(providers)
        session = self.real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        session.get_providers = lambda: list(self.started)
        return session


def _fake_gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch, started: list[str]) -> _SessionRecorder:
    import onnxruntime

    recorder = _SessionRecorder(started)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", recorder)
    monkeypatch.setattr(backends, "trt_provider_problem", lambda needs, version, reason: None)
    return recorder


def test_fallback_from_the_tensorrt_provider_is_reported(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point 4: onnxruntime falls back from TensorRT to CUDA on its own; the backend says so."""
    bundle = load_bundle(_loadable(fake_bundle))
    _machine(monkeypatch, "9.0")
    recorder = _fake_gpu_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = select_backend(bundle, "auto", "fp32", threads=1)
    assert recorder.calls[0][0][0] == "TensorrtExecutionProvider"  # it was asked for
    assert backend.name == "ort-cuda"
    assert any("could not start TensorrtExecutionProvider" in n for n in backend.notes)
    assert any("no TensorRT engines" in n for n in backend.notes)
    explicit = select_backend(bundle, "ort-trt", "fp32", threads=1)
    assert explicit.name == "ort-cuda" and explicit.notes


def test_tensorrt_provider_keeps_the_graph_types(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point 5: no precision flag reaches onnxruntime's TensorRT provider for any precision
    (either one makes its network weakly typed and the fp16 graphs' FP32 islands may run in FP16)."""
    root = _loadable(fake_bundle)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graphs"]["fp16"] = manifest["graphs"]["int8"] = manifest["graphs"]["fp32"]
    write_manifest(root, manifest, list(manifest["files"]))
    bundle = load_bundle(root)
    _machine(monkeypatch, "9.0")
    recorder = _fake_gpu_onnxruntime(monkeypatch, ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("CLIPLLAMA_TRT_CACHE", str(root / "cache"))
    for precision in ("fp16", "int8", "fp32"):
        backend = OrtBackend(bundle, precision, backends._ORT_PROVIDERS["ort-trt"], threads=1)
        assert backend.name == "ort-trt" and backend.notes == []
    for providers in recorder.calls:
        name, options = providers[0]
        assert name == "TensorrtExecutionProvider"
        assert not any(k in options for k in ("trt_fp16_enable", "trt_int8_enable", "trt_bf16_enable"))
        assert options["trt_engine_cache_path"] == str(root / "cache")


def test_tensorrt_provider_with_the_wrong_tensorrt(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point 1 at run time: onnxruntime-gpu's provider links TensorRT 10, TensorRT 11 is
    installed: auto uses CUDA and says why; ``--backend ort-trt`` refuses in one line."""
    from runtime.gpu import trt_provider_problem

    bundle = load_bundle(_loadable(fake_bundle))
    _machine(monkeypatch, "9.0")
    _fake_gpu_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backends, "trt_provider_needs", lambda module_file: "libnvinfer.so.10")
    monkeypatch.setattr(backends, "tensorrt_status", lambda: ("11.4.0.106", None))
    monkeypatch.setattr(backends, "trt_provider_problem", trt_provider_problem)
    backend = select_backend(bundle, "auto", "fp32", threads=1)
    assert backend.name == "ort-cuda"
    assert any("links libnvinfer.so.10 (TensorRT 10), this is TensorRT 11.4.0.106" in n for n in backend.notes)
    with pytest.raises(BackendError, match=r"TensorRT 10.*clipllama\[trt\]"):
        select_backend(bundle, "ort-trt", "fp32", threads=1)


@pytest.mark.parametrize(("probe", "expected"), [
    (GpuProbe(None, "cuda-bindings is not installed (pip install 'clipllama[gpu]')"), "cuda-bindings is not installed"),
    (GpuProbe(None, "the NVIDIA driver is too old: it supports CUDA 12.4, the installed cuda-bindings need "
                    "CUDA 13.0 (update the driver; CUDA 13 needs r580 or newer)"), "driver is too old"),
])
def test_engines_not_used_say_why(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch, probe: GpuProbe,
                                  expected: str) -> None:
    """Points 2 and 3: no cuda-bindings, or a driver too old for them: the engines are not used
    and the notes say so (they used to be skipped without a word)."""
    root = _with_engines(fake_bundle, [_engine(g, cc="9.0", precision="fp32") for g in GRAPH_NAMES], "fp32")
    bundle = load_bundle(_loadable(root))
    _machine(monkeypatch, probe, "10.3.0")
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    backend = select_backend(bundle, "auto", "fp32", threads=1)
    assert backend.name == "ort-cpu" and backend.gpu_absent is False
    engine_notes = [n for n in backend.notes if ".engine" in n]
    assert len(engine_notes) == 1 and expected in engine_notes[0]
    assert any("onnxruntime runs on the CPU" in n for n in backend.notes)


def test_no_gpu_at_all_is_quiet_but_said(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(_loadable(fake_bundle))
    _machine(monkeypatch, NO_GPU, None)
    backend = select_backend(bundle, "auto", "fp32", threads=1)
    assert backend.name == "ort-cpu" and backend.gpu_absent is True
    assert backend.notes == ["onnxruntime runs on the CPU, as there is no NVIDIA GPU: no CUDA device "
                             "(cudaErrorNoDevice)"]
    assert select_backend(bundle, "ort-cpu", "fp32", threads=1).notes == []


@pytest.mark.parametrize("version", ["10.3.0.26", "11.4.0.106"])
def test_tensorrt_backend_passes_the_native_stream_handle(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                          version: str) -> None:
    """Point 6: the stream goes to ``execute_async_v3`` as its native handle (cuda-bindings 13
    deprecate ``int(stream)``), with TensorRT 10 and 11 alike."""
    bindings = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed here")
    engines = [_engine("image_encoder", max_batch=4, precision="fp32")]
    root = _with_engines(fake_bundle, engines, "fp32")
    (root / engines[0]["file"]).write_text(json.dumps(["images", "image_features"]))
    manifest = json.loads((root / "manifest.json").read_text())
    write_manifest(root, manifest, list(manifest["files"]))
    cudart, log = _FakeCudart(), []
    monkeypatch.setattr(cudart, "cudaStreamCreate", lambda: (0, bindings.cudaStream_t(77)), raising=False)
    trt = _fake_tensorrt(cudart, log)
    trt.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backends, "_cudart", lambda: cudart)
    bundle = load_bundle(root)
    backend = TensorRTBackend(bundle, {"image_encoder": bundle.engines[0]})
    out = backend.run("image_encoder", {"images": np.ones((2, 3))})["image_features"]
    np.testing.assert_allclose(out, np.full((2, 3), 3.0))
    assert log == [2]
    backend.close()
