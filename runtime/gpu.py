"""What this machine offers the GPU backends, and in one line why not when it offers nothing.

Three things decide which backend runs: a CUDA GPU that ``cuda-bindings`` can talk to (its
compute capability picks the TensorRT engines), the ``tensorrt`` package (engines, and the
libraries onnxruntime's TensorRT provider loads), and an onnxruntime build with the CUDA and
TensorRT providers (``onnxruntime-gpu``). Each probe returns the answer or the reason, never
raises, and imports nothing until called, so a CPU machine needs none of these packages.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: The extras of pyproject.toml, as a user types them.
GPU_EXTRA = "pip install 'clipllama[gpu]'"
TRT_EXTRA = "pip install 'clipllama[trt]'"
#: cudaError_t values the probe tells apart (CUDA runtime API).
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
#: Files that exist where the NVIDIA kernel driver is loaded (Linux).
DRIVER_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl")


@dataclass(frozen=True)
class GpuProbe:
    """The CUDA device the backends would use, or why there is none."""

    compute_capability: str | None
    #: why there is no usable GPU (None when there is one)
    reason: str | None = None
    #: True when there is simply no NVIDIA GPU or driver (nothing to fix on this machine)
    absent: bool = False


def load_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6; ImportError when neither exists
    return runtime


def _code(error: Any) -> int:
    return int(getattr(error, "value", error))


def _error_name(error: Any) -> str:
    return str(getattr(error, "name", error))


def _cuda_version(value: int) -> str:
    """CUDA's integer version (12040) as text (12.4)."""
    return f"{value // 1000}.{value % 1000 // 10}"


def driver_loaded(markers: tuple[str, ...] = DRIVER_MARKERS) -> bool:
    """Whether an NVIDIA kernel driver is loaded (Linux; False elsewhere)."""
    return any(Path(m).exists() for m in markers)


def probe_gpu(device: int = 0, cudart: Any = None, driver: Callable[[], bool] = driver_loaded) -> GpuProbe:
    """The compute capability of CUDA device ``device``, or the reason there is none.

    ``cudart`` (tests: a fake) defaults to cuda-python's runtime bindings.
    """
    if cudart is None:
        try:
            cudart = load_cudart()
        except Exception as exc:  # ImportError, or a broken install raising its own type
            if isinstance(exc, ImportError):
                why = f"cuda-bindings is not installed ({GPU_EXTRA})"
            else:
                why = f"cuda-bindings cannot be imported ({type(exc).__name__}: {exc})"
            present = driver()
            return GpuProbe(None, why if present else f"no NVIDIA driver; {why}", absent=not present)
    try:
        error, count = cudart.cudaGetDeviceCount()
        code = _code(error)
        if code == CUDA_ERROR_INSUFFICIENT_DRIVER:
            return _driver_problem(cudart)
        if code == CUDA_ERROR_NO_DEVICE:
            return GpuProbe(None, "no CUDA device (cudaErrorNoDevice)", absent=True)
        if code != 0:
            return GpuProbe(None, f"CUDA cannot list the devices ({_error_name(error)})")
        if count <= device:
            return GpuProbe(None, f"no CUDA device {device} ({count} found)", absent=count == 0)
        attr = cudart.cudaDeviceAttr
        values = []
        for which in (attr.cudaDevAttrComputeCapabilityMajor, attr.cudaDevAttrComputeCapabilityMinor):
            error, value = cudart.cudaDeviceGetAttribute(which, device)
            if _code(error) != 0:
                return GpuProbe(None, f"CUDA cannot read device {device}'s compute capability ({_error_name(error)})")
            values.append(int(value))
    except Exception as exc:  # the bindings raise their own types (library not found, ...)
        return GpuProbe(None, f"CUDA is not usable ({type(exc).__name__}: {exc})")
    return GpuProbe(f"{values[0]}.{values[1]}")


def _driver_problem(cudart: Any) -> GpuProbe:
    """cudaErrorInsufficientDriver: no driver at all, or one too old for these bindings."""
    try:
        _, driver_version = cudart.cudaDriverGetVersion()
        _, runtime_version = cudart.cudaRuntimeGetVersion()
    except Exception:  # noqa: BLE001 - the bindings raise their own types
        driver_version = runtime_version = -1
    if driver_version == 0:
        return GpuProbe(None, "no NVIDIA driver (cudaErrorInsufficientDriver)", absent=True)
    if driver_version > 0 and runtime_version > 0:
        return GpuProbe(None, f"the NVIDIA driver is too old: it supports CUDA {_cuda_version(driver_version)}, "
                              f"the installed cuda-bindings need CUDA {_cuda_version(runtime_version)} "
                              "(update the driver; CUDA 13 needs r580 or newer)")
    return GpuProbe(None, "the NVIDIA driver is too old for the installed cuda-bindings (cudaErrorInsufficientDriver)")


def tensorrt_status() -> tuple[str | None, str | None]:
    """``(version, None)`` of the importable ``tensorrt`` package, else ``(None, reason)``."""
    try:
        import tensorrt
    except ImportError:
        return None, f"tensorrt is not installed ({TRT_EXTRA})"
    except Exception as exc:  # its libraries failed to load
        return None, f"tensorrt cannot be imported ({type(exc).__name__}: {exc})"
    return str(tensorrt.__version__), None


def installed(distribution: str) -> str | None:
    """The installed version of a distribution (a pip package name), or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def ort_gpu_problem(available: list[str], version: Callable[[str], str | None] = installed) -> str | None:
    """Why onnxruntime has no CUDA provider here (None when it has one)."""
    if "CUDAExecutionProvider" in available:
        return None
    if version("onnxruntime-gpu"):
        return ("onnxruntime-gpu is installed but the CPU package onnxruntime shadows it (pip uninstall -y "
                "onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu)")
    return f"onnxruntime has no CUDA provider: onnxruntime-gpu is not installed ({GPU_EXTRA})"


def trt_provider_needs(ort_module_file: str | None) -> str | None:
    """The ``libnvinfer.so.N`` that onnxruntime's TensorRT provider library links, read from
    the library itself (None when there is no such library)."""
    if not ort_module_file:
        return None
    library = Path(ort_module_file).parent / "capi" / "libonnxruntime_providers_tensorrt.so"
    try:
        found = re.search(rb"libnvinfer\.so\.(\d+)", library.read_bytes())
    except OSError:
        return None
    return f"libnvinfer.so.{found.group(1).decode()}" if found else None


def trt_provider_problem(needs: str | None, trt_version: str | None, trt_reason: str | None,
                         load: Callable[[str], Any] = ctypes.CDLL) -> str | None:
    """Why onnxruntime's TensorRT provider cannot start (None when its TensorRT loads).

    ``needs`` is :func:`trt_provider_needs`; the ``tensorrt`` package is imported first (by
    :func:`tensorrt_status`), which loads its wheel's libraries so the provider finds them.
    """
    if needs is None:
        return None
    major = needs.rsplit(".", 1)[-1]
    if trt_version is not None and trt_version.split(".")[0] != major:
        return (f"onnxruntime's TensorRT provider links {needs} (TensorRT {major}), this is TensorRT "
                f"{trt_version} ({TRT_EXTRA} installs the matching one)")
    try:
        load(needs)
    except OSError:
        why = trt_reason or f"{needs} is not found"
        return f"onnxruntime's TensorRT provider needs TensorRT {major}: {why}"
    return None
