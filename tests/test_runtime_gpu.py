"""The GPU probes and the TensorRT/cuda-bindings version adapter, with fakes (issue 13,
points 1-3 and 6): every way of not having a usable GPU gives its own one-line reason."""

from __future__ import annotations

import enum
import types
from pathlib import Path

import pytest

from runtime import gpu, trt_api
from runtime.gpu import GpuProbe, ort_gpu_problem, probe_gpu, trt_provider_needs, trt_provider_problem


class _Attr(enum.IntEnum):
    cudaDevAttrComputeCapabilityMajor = 75  # noqa: N815 - cuda-python's names
    cudaDevAttrComputeCapabilityMinor = 76  # noqa: N815


class FakeCudart:
    """cuda-python's runtime calls the probe makes, answering like a machine would."""

    cudaDeviceAttr = _Attr  # noqa: N815

    def __init__(self, count_error: int = 0, count: int = 1, cc: tuple[int, int] = (9, 0),
                 driver: int = 13000, runtime: int = 13000) -> None:
        self.count_error, self.count, self.cc, self.driver, self.runtime = count_error, count, cc, driver, runtime

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.count_error, self.count

    def cudaDeviceGetAttribute(self, attr, device):  # noqa: N802
        return 0, self.cc[0] if attr == _Attr.cudaDevAttrComputeCapabilityMajor else self.cc[1]

    def cudaDriverGetVersion(self):  # noqa: N802
        return 0, self.driver

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return 0, self.runtime


def test_a_working_gpu() -> None:
    assert probe_gpu(cudart=FakeCudart(cc=(8, 9))) == GpuProbe("8.9")


def test_driver_too_old_is_not_no_gpu() -> None:
    """Point 3: cudaErrorInsufficientDriver with a driver present names both CUDA versions."""
    probe = probe_gpu(cudart=FakeCudart(count_error=gpu.CUDA_ERROR_INSUFFICIENT_DRIVER, driver=12040, runtime=13000))
    assert probe.compute_capability is None and not probe.absent
    assert "driver is too old" in probe.reason and "CUDA 12.4" in probe.reason and "CUDA 13.0" in probe.reason


def test_no_driver_and_no_device_are_absent() -> None:
    no_driver = probe_gpu(cudart=FakeCudart(count_error=gpu.CUDA_ERROR_INSUFFICIENT_DRIVER, driver=0))
    assert no_driver.absent and "no NVIDIA driver" in no_driver.reason
    no_device = probe_gpu(cudart=FakeCudart(count_error=gpu.CUDA_ERROR_NO_DEVICE, count=0))
    assert no_device.absent and "no CUDA device" in no_device.reason
    assert probe_gpu(device=1, cudart=FakeCudart(count=1)).reason == "no CUDA device 1 (1 found)"
    other = probe_gpu(cudart=FakeCudart(count_error=999))
    assert not other.absent and "999" in other.reason


def test_missing_bindings_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point 2: without cuda-bindings the probe says so and which extra installs them."""

    def missing():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(gpu, "load_cudart", missing)
    with_driver = probe_gpu(driver=lambda: True)
    assert not with_driver.absent and "cuda-bindings is not installed" in with_driver.reason
    assert "clipllama[gpu]" in with_driver.reason
    assert probe_gpu(driver=lambda: False).absent


def test_this_machine_has_no_gpu_and_says_why() -> None:
    probe = probe_gpu()
    if probe.compute_capability is not None:
        pytest.skip("this machine has a CUDA GPU")
    assert probe.reason and "\n" not in probe.reason


def test_onnxruntime_gpu_problems() -> None:
    assert ort_gpu_problem(["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    shadowed = ort_gpu_problem(["CPUExecutionProvider"], version=lambda name: "1.31.1")
    assert "shadows it" in shadowed and "--force-reinstall --no-deps onnxruntime-gpu" in shadowed
    assert "clipllama[gpu]" in ort_gpu_problem(["CPUExecutionProvider"], version=lambda name: None)


def test_tensorrt_provider_library_and_its_tensorrt(tmp_path: Path) -> None:
    """Point 1: the TensorRT the onnxruntime provider links is read from its library and
    compared with the installed tensorrt."""
    (tmp_path / "capi").mkdir()
    (tmp_path / "capi" / "libonnxruntime_providers_tensorrt.so").write_bytes(b"\0ELF..libnvinfer.so.10\0..")
    needs = trt_provider_needs(str(tmp_path / "__init__.py"))
    assert needs == "libnvinfer.so.10"
    assert trt_provider_needs(str(tmp_path / "elsewhere" / "__init__.py")) is None
    loaded = []
    assert trt_provider_problem(needs, "10.16.1.11", None, load=loaded.append) is None and loaded == [needs]
    wrong = trt_provider_problem(needs, "11.4.0.106", None, load=loaded.append)
    assert "TensorRT 10" in wrong and "11.4.0.106" in wrong and "clipllama[trt]" in wrong

    def not_found(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    missing = trt_provider_problem(needs, None, "tensorrt is not installed (pip install 'clipllama[trt]')",
                                   load=not_found)
    assert "needs TensorRT 10" in missing and "clipllama[trt]" in missing


# -- the version adapter -----------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


def _trt(version: str) -> types.SimpleNamespace:
    flags = types.SimpleNamespace(TF32="TF32", FP16="FP16")
    creation = types.SimpleNamespace(STRONGLY_TYPED=0) if version.startswith("10") else types.SimpleNamespace()
    return types.SimpleNamespace(__version__=version, BuilderFlag=flags, NetworkDefinitionCreationFlag=creation,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


def test_strong_typing_flag_only_where_it_means_something() -> None:
    """Point 6: TensorRT 10 gets STRONGLY_TYPED; TensorRT 11 (always strongly typed, flag
    deprecated and ignored) gets no flag."""
    builder = _Recorder()
    trt_api.create_network(_trt("10.16.1.11"), builder)
    trt_api.create_network(_trt("11.4.0.106"), builder)
    assert builder.calls == [("create_network", 1), ("create_network", 0)]


def test_builder_config_sets_no_precision_flag() -> None:
    for version in ("10.13.2.6", "11.4.0.106"):
        config = _Recorder()
        trt_api.configure(_trt(version), config, 1 << 30)
        assert config.calls == [("set_memory_pool_limit", "WORKSPACE", 1 << 30), ("clear_flag", "TF32")]


def test_stream_handle() -> None:
    assert trt_api.stream_handle(5) == 5
    bindings = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed here")
    assert trt_api.stream_handle(bindings.cudaStream_t(1234)) == 1234


# -- the extras (points 1, 2 and 7) -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement(extra: str, name: str):
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in _project()["optional-dependencies"][extra]]
    return next(r for r in found if r.name == name)


def test_gpu_extras_pin_a_tensorrt_the_onnxruntime_provider_can_load() -> None:
    """Point 1: onnxruntime-gpu 1.31 (its TensorRT provider links libnvinfer.so.10) only with
    TensorRT 10 for CUDA 13; point 2: cuda-bindings in the extra."""
    ort = _requirement("gpu", "onnxruntime-gpu")
    assert ort.specifier.contains("1.31.1") and not ort.specifier.contains("1.32.0")
    assert not ort.specifier.contains("1.30.0")  # CUDA 12 builds before 1.31
    bindings = _requirement("gpu", "cuda-bindings")
    assert bindings.specifier.contains("13.5.0") and not bindings.specifier.contains("14.0.0")
    tensorrt = _requirement("trt", "tensorrt-cu13")
    assert tensorrt.specifier.contains("10.16.1.11") and tensorrt.specifier.contains("10.13.2.6")
    assert not tensorrt.specifier.contains("11.4.0.106") and not tensorrt.specifier.contains("10.12.0.36")
    assert "clipllama[gpu]" in _project()["optional-dependencies"]["trt"]
    text = (REPO / "pyproject.toml").read_text()
    assert "libnvinfer.so.10" in text  # the reason is written beside the pins


def test_python_version_matches_the_gpu_packages() -> None:
    """Point 7: onnxruntime-gpu 1.31 and cuda-bindings 13 need Python 3.11."""
    from packaging.specifiers import SpecifierSet

    requires = SpecifierSet(_project()["requires-python"])
    assert not requires.contains("3.10.14") and requires.contains("3.11.7")


def test_readme_gpu_install_matches_the_extras() -> None:
    readme = (REPO / "README.md").read_text()
    bounds = sorted(str(s) for s in _requirement("gpu", "onnxruntime-gpu").specifier)  # ">=1.31.1", "<1.32"
    assert 'pip install ".[trt]"' in readme
    assert f'"onnxruntime-gpu{bounds[1]},{bounds[0]}"' in readme
    assert "NVIDIA's own package index" in readme
