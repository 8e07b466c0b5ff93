"""Inference backends behind one interface: ``run(graph_name, feeds) -> outputs``.

* :class:`OrtBackend` runs the bundle's ONNX graphs with onnxruntime (TensorRT EP, CUDA EP
  or CPU).
* :class:`TensorRTBackend` runs prebuilt TensorRT engines (``tensorrt`` plus
  ``cuda-python``'s runtime bindings for device memory; no torch).
* :class:`RoutedBackend` sends each graph to the backend that has it (engines for some
  graphs, ONNX for the rest).

:func:`select_backend` picks one: ``auto`` takes TensorRT engines built for this GPU's
compute capability and this TensorRT version, else onnxruntime with the best provider,
else the CPU. An engine for another GPU or TensorRT version gives a warning and the ONNX
graph instead. GPU libraries are imported lazily, so a CPU machine needs none of them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.bundle import GRAPH_NAMES, Bundle, BundleError, EngineSpec, GraphSpec

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
PRECISIONS = ("fp32", "fp16", "int8")

_ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_NUMPY_DTYPES = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class BackendError(RuntimeError):
    """A backend that cannot be created or run; the message says why."""


class Backend(Protocol):
    """What the recognizer needs from a backend."""

    name: str
    precision: str

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph`` on named inputs; outputs by name (float outputs as float32)."""
        ...

    def close(self) -> None: ...


def numpy_dtype(name: str) -> type:
    """numpy type of a manifest dtype name (``float32``, ``int64``, ...)."""
    try:
        return _NUMPY_DTYPES[name.lower().removeprefix("tensor(").removesuffix(")")]
    except KeyError:
        raise BackendError(f"unsupported tensor dtype {name!r}") from None


def cast_feeds(spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs, each contiguous and in the dtype the manifest declares."""
    out = {}
    for tensor in spec.inputs:
        if tensor.name not in feeds:
            raise BackendError(f"{spec.name}: missing input {tensor.name!r}")
        out[tensor.name] = np.ascontiguousarray(feeds[tensor.name], dtype=numpy_dtype(tensor.dtype))
    return out


def _float32(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in outputs.items()}


def default_threads() -> int:
    """Intra-op threads: ``CLIPLLAMA_THREADS`` if set, else the CPU count capped at 8."""
    value = os.environ.get("CLIPLLAMA_THREADS")
    if value:
        return max(1, int(value))
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(available, 8))


class OrtBackend:
    """The bundle's ONNX graphs of one precision in onnxruntime sessions."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, graphs: tuple[str, ...] = GRAPH_NAMES) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing and missing[0] == wanted[0]:
            raise BackendError(f"onnxruntime provider {wanted[0]} is not available "
                               f"(available: {', '.join(available)})")
        self.providers = [p for p in wanted if p in available]
        self.precision = precision
        self.name = "ort-" + {"TensorrtExecutionProvider": "trt", "CUDAExecutionProvider": "cuda"}.get(
            self.providers[0], "cpu")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.specs = {name: bundle.graph(precision, name) for name in graphs}
        self.sessions: dict[str, Any] = {}
        # onnxruntime 1.31's CPU NchwcTransformer segfaults on the fp16 graphs (level ALL)
        disabled = ["NchwcTransformer"] if precision == "fp16" else None
        for name, spec in self.specs.items():
            try:
                self.sessions[name] = ort.InferenceSession(
                    str(bundle.path(spec.file)), sess_options=options,
                    providers=self._provider_options(bundle, precision), disabled_optimizers=disabled,
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{spec.file}: onnxruntime cannot load it ({exc})") from exc

    def _provider_options(self, bundle: Bundle, precision: str) -> list[Any]:
        out: list[Any] = []
        for provider in self.providers:
            if provider == "TensorrtExecutionProvider":
                options: dict[str, Any] = {"trt_fp16_enable": precision == "fp16",
                                           "trt_int8_enable": precision == "int8"}
                cache = Path(os.environ.get("CLIPLLAMA_TRT_CACHE", Path.home() / ".cache" / "clipllama" / "trt"))
                try:  # engines built by the EP are cached between runs when there is a writable place
                    cache.mkdir(parents=True, exist_ok=True)
                    options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                                   trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
                except OSError:
                    pass
                out.append((provider, options))
            else:
                out.append(provider)
        return out

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        values = self.sessions[graph].run([t.name for t in spec.outputs], cast_feeds(spec, feeds))
        return _float32({t.name: v for t, v in zip(spec.outputs, values)})

    def close(self) -> None:
        self.sessions.clear()


# -- TensorRT -------------------------------------------------------------------------


def _cudart() -> Any:
    """cuda-python's runtime module (new and old import paths)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            raise BackendError("the TensorRT backend needs cuda-python (pip install cuda-python)") from None
    return runtime


def _check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendError(f"CUDA error {error!r}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_compute_capability(device: int = 0) -> str | None:
    """``"major.minor"`` of a CUDA device, or None when there is none (or no cuda-python)."""
    try:
        cudart = _cudart()
        count = _check(cudart.cudaGetDeviceCount())
        if count <= device:
            return None
        major = _check(cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device))
        minor = _check(cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device))
        return f"{major}.{minor}"
    except Exception:  # no driver, no device, no bindings: no GPU for us
        return None


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None."""
    try:
        import tensorrt
    except Exception:
        return None
    return str(tensorrt.__version__)


def normalize_cc(value: str) -> str:
    """``"8.9"``, ``"89"``, ``"sm89"``, ``"sm_89"`` -> ``"8.9"``."""
    text = str(value).lower().removeprefix("sm").strip("_")
    if "." in text:
        return text
    return f"{text[:-1]}.{text[-1]}" if len(text) >= 2 else text


def same_trt_version(a: str, b: str) -> bool:
    """Engines are tied to the TensorRT build: compare major.minor.patch."""
    return a.split(".")[:3] == b.split(".")[:3]


def engine_mismatch(engine: EngineSpec, cc: str | None, trt_version: str | None) -> str | None:
    """Why ``engine`` cannot run here (None when it can)."""
    if cc is None:
        return "no CUDA GPU"
    if trt_version is None:
        return "TensorRT is not installed"
    if normalize_cc(engine.compute_capability) != cc:
        return f"built for compute capability {engine.compute_capability}, this GPU is {cc}"
    if not same_trt_version(engine.tensorrt_version, trt_version):
        return f"built with TensorRT {engine.tensorrt_version}, this is TensorRT {trt_version}"
    return None


class _DeviceBuffer:
    """A growable device allocation."""

    def __init__(self, cudart: Any) -> None:
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(_check(self.cudart.cudaMalloc(max(nbytes, 256))))
            self.nbytes = max(nbytes, 256)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _check(self.cudart.cudaFree(self.ptr))
            self.ptr, self.nbytes = 0, 0


class _Engine:
    """One deserialized engine with its context and buffers."""

    def __init__(self, trt: Any, cudart: Any, runtime: Any, path: Path, spec: EngineSpec) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the engine")
        self.trt, self.cudart, self.spec, self.engine = trt, cudart, spec, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: _DeviceBuffer(cudart) for n in names}

    def run(self, feeds: dict[str, np.ndarray], stream: Any) -> dict[str, np.ndarray]:
        cudart, ctx = self.cudart, self.context
        host_inputs = {}
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            host_inputs[name] = array
            if ctx.set_input_shape(name, array.shape) is False:
                raise BackendError(f"{self.spec.file}: input {name} of shape {array.shape} is outside the "
                                   f"engine's profile (batch {self.spec.min_batch}..{self.spec.max_batch})")
            ptr = self.buffers[name].ensure(array.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            ctx.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            ctx.set_tensor_address(name, self.buffers[name].ensure(results[name].nbytes))
        if not ctx.execute_async_v3(int(stream)):
            raise BackendError(f"{self.spec.file}: TensorRT execution failed")
        for name, array in results.items():
            _check(cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].ptr, array.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        del host_inputs  # kept alive until the copies finished
        return results

    def free(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()


class TensorRTBackend:
    """Prebuilt TensorRT engines, one per graph; batches beyond an engine's profile are split."""

    name = "trt"

    def __init__(self, bundle: Bundle, engines: dict[str, EngineSpec]) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError("the TensorRT backend needs the tensorrt package (pip install tensorrt)") from None
        self.cudart = _cudart()
        self.precision = next(iter(engines.values())).precision if engines else "fp16"
        self.specs = {g: bundle.graph(e.precision, g) for g, e in engines.items()}
        self.stream = _check(self.cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {g: _Engine(trt, self.cudart, runtime, bundle.path(e.file), e) for g, e in engines.items()}

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = self.engines[graph]
        batch = next(iter(feeds.values())).shape[0]
        step = max(1, engine.spec.max_batch)
        parts = [engine.run({k: v[i:i + step] for k, v in feeds.items()}, self.stream)
                 for i in range(0, batch, step)]
        return _float32({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def close(self) -> None:
        for engine in self.engines.values():
            engine.free()
        self.engines.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class RoutedBackend:
    """Each graph on its own backend (TensorRT engines for some, ONNX for the rest)."""

    def __init__(self, routes: dict[str, Backend]) -> None:
        self.routes = routes
        names = sorted({b.name for b in routes.values()})
        self.name = "+".join(names)
        self.precision = "/".join(sorted({b.precision for b in routes.values()}))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.routes[graph].run(graph, feeds)

    def close(self) -> None:
        for backend in {id(b): b for b in self.routes.values()}.values():
            backend.close()


# -- selection ------------------------------------------------------------------------


def matching_engines(bundle: Bundle, precision: str, warn: bool = True) -> dict[str, EngineSpec]:
    """Engines of ``precision`` that can run on this machine, by graph; warns about the rest."""
    if not bundle.engines:
        return {}
    cc, version = gpu_compute_capability(), tensorrt_version()
    found: dict[str, EngineSpec] = {}
    for engine in bundle.engines:
        if engine.precision != precision or engine.graph in found:
            continue
        reason = engine_mismatch(engine, cc, version)
        if reason is None:
            found[engine.graph] = engine
        elif warn and cc is not None:
            warnings.warn(f"TensorRT engine {engine.file} is not usable here ({reason}); "
                          "using the ONNX graph instead", RuntimeWarning, stacklevel=3)
    return found


def _ort_best(bundle: Bundle, precision: str, threads: int | None) -> Backend:
    import onnxruntime as ort

    available = ort.get_available_providers()
    for name in ("ort-trt", "ort-cuda"):
        if _ORT_PROVIDERS[name][0] in available:
            try:
                return OrtBackend(bundle, precision, _ORT_PROVIDERS[name], threads)
            except BackendError as exc:
                warnings.warn(f"{name} failed ({exc}); trying the next provider", RuntimeWarning, stacklevel=3)
    return OrtBackend(bundle, precision, _ORT_PROVIDERS["ort-cpu"], threads)


def _ort_gpu_available() -> bool:
    import onnxruntime as ort

    return any(_ORT_PROVIDERS[n][0] in ort.get_available_providers() for n in ("ort-trt", "ort-cuda"))


def default_precision(bundle: Bundle, backend: str) -> str:
    """fp16 where a GPU runs it and the bundle has it, else fp32 (fp16 on a CPU is slow)."""
    if backend in ("trt", "ort-trt", "ort-cuda"):
        gpu = True
    elif backend == "auto" and gpu_compute_capability() is not None:
        gpu = _ort_gpu_available() or bool(matching_engines(bundle, "fp16", warn=False))
    else:
        gpu = False
    if gpu and ("fp16" in bundle.precisions or any(e.precision == "fp16" for e in bundle.engines)):
        return "fp16"
    return "fp32" if "fp32" in bundle.precisions else bundle.precisions[0]


def select_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                   threads: int | None = None) -> Backend:
    """Create the backend ``backend`` (see :data:`BACKENDS`) for ``bundle``."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    precision = precision or default_precision(bundle, backend)
    if precision not in bundle.graphs and not any(e.precision == precision for e in bundle.engines):
        raise BundleError(f"{bundle.root}: no {precision} variant (has {', '.join(bundle.precisions)})")
    if backend == "trt":
        engines = matching_engines(bundle, precision)
        missing = [g for g in GRAPH_NAMES if g not in engines]
        if missing:
            raise BackendError(f"no usable {precision} TensorRT engine for {', '.join(missing)} "
                               f"(GPU {gpu_compute_capability()}, TensorRT {tensorrt_version()})")
        return TensorRTBackend(bundle, engines)
    if backend in _ORT_PROVIDERS:
        return OrtBackend(bundle, precision, _ORT_PROVIDERS[backend], threads)
    engines = matching_engines(bundle, precision)
    if engines:
        try:
            trt_backend = TensorRTBackend(bundle, engines)
        except BackendError as exc:
            warnings.warn(f"TensorRT engines not usable ({exc}); using onnxruntime", RuntimeWarning, stacklevel=2)
        else:
            rest = tuple(g for g in GRAPH_NAMES if g not in engines)
            if not rest:
                return trt_backend
            ort_backend = _ort_best(bundle, precision, threads) if precision in bundle.precisions else None
            if ort_backend is None:
                raise BackendError(f"no ONNX {precision} graphs for {', '.join(rest)}")
            return RoutedBackend({g: trt_backend if g in engines else ort_backend for g in GRAPH_NAMES})
    return _ort_best(bundle, precision, threads)
