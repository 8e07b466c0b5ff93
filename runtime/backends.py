"""Inference backends behind one interface: ``run(graph_name, feeds) -> outputs``.

* :class:`OrtBackend` runs the bundle's ONNX graphs with onnxruntime (TensorRT provider,
  CUDA provider or CPU); its ``name`` is the provider onnxruntime actually started.
* :class:`TensorRTBackend` runs prebuilt TensorRT engines (``tensorrt`` plus
  ``cuda-bindings`` for device memory; no torch; TensorRT 10 and 11, see ``runtime.trt_api``).
* :class:`RoutedBackend` sends each graph to the backend that has it (engines for some
  graphs, ONNX for the rest).
* :class:`RecheckedBackend` (``--precision int8+fp32``) runs the int8 graphs and keeps the
  fp32 image encoder for the crops the recognizer reads again (:data:`RECHECKED`).

:func:`select_backend` picks one: ``auto`` takes TensorRT engines built for this GPU's
compute capability and this TensorRT version, else onnxruntime with the best provider that
starts, else the CPU. Every backend it returns carries ``notes``: one line for each faster
way that was not taken and why (no GPU, driver too old, a package missing, an engine for
another GPU or TensorRT version, a provider that failed to start). GPU libraries are
imported lazily, so a CPU machine needs none of them.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime import trt_api
from runtime.bundle import GRAPH_NAMES, Bundle, BundleError, EngineSpec, GraphSpec
from runtime.gpu import (
    TRT_EXTRA,
    GpuProbe,
    load_cudart,
    ort_gpu_problem,
    probe_gpu,
    tensorrt_status,
    trt_provider_needs,
    trt_provider_problem,
)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt")
PRECISIONS = ("fp32", "fp16", "int8")
#: int8 graphs first; the crops whose int8 CTC reading is less confident than the bundle's
#: ``defaults.int8_recheck.below_confidence`` are read again by the fp32 image encoder
RECHECKED = "int8+fp32"
#: what ``--precision`` takes: a precision, ``int8+fp32`` or ``auto`` (:func:`default_precision`)
PRECISION_CHOICES = ("auto", *PRECISIONS, RECHECKED)
#: the manifest's graphs key of a second int8 image encoder, made and validated on an x86 CPU
#: without VNNI (``export.onnx --no-vnni``); such CPUs read it instead of ``int8``'s
INT8_NO_VNNI = "int8_no_vnni"
#: the manifest's ``defaults`` key of the ``int8+fp32`` threshold fitted to each int8 image encoder
RECHECK_KEYS = {"int8": "int8_recheck", INT8_NO_VNNI: "int8_no_vnni_recheck"}

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
    #: why faster backends were not used, one line each (see :func:`select_backend`)
    notes: list[str]

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


#: environment variable that sets the default intra-op thread count
THREADS_ENV = "CLIPLLAMA_THREADS"
#: the default never takes more threads than this (measured: docs/int8.md)
MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Intra-op threads: ``CLIPLLAMA_THREADS`` if set (a whole number >= 1, else a
    :class:`BackendError` naming it), else the CPUs this process may use, capped at 8.

    Every session of the pipeline gets this many threads and they do not spin (see
    :func:`session_options`), so one pool per session costs nothing while another runs.
    """
    value = os.environ.get(THREADS_ENV)
    if value is not None and value.strip():
        try:
            count = int(value.strip())
        except ValueError:
            raise BackendError(f"{THREADS_ENV}={value!r} is not a whole number of threads "
                               f"(unset it for the default)") from None
        if count < 1:
            raise BackendError(f"{THREADS_ENV}={value.strip()}: threads must be at least 1 "
                               f"(unset it for the default)")
        return count
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(available, MAX_DEFAULT_THREADS))


def session_options(threads: int | None = None) -> Any:
    """onnxruntime session options of the pipeline: ``threads`` intra-op threads (the
    default: :func:`default_threads`), one inter-op thread, sequential, and no spinning.

    The pipeline runs four sessions one after the other, each with its own pool; threads
    that spin after a run (onnxruntime's default) keep the cores busy while the next
    session wants them: 41.7 ms per crop at batch 1 with spinning, 14.2 without, on 2 cores.
    """
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise BackendError(f"threads must be at least 1, got {threads} (leave it out for the default)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


_PROVIDER_SHORT = {"TensorrtExecutionProvider": "trt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def ort_name(provider: str) -> str:
    """``ort-trt``, ``ort-cuda`` or ``ort-cpu`` for an onnxruntime provider name."""
    return "ort-" + _PROVIDER_SHORT.get(provider, provider.removesuffix("ExecutionProvider").lower())


def tensorrt_provider_options(cache_dir: Path | None) -> dict[str, Any]:
    """Options of onnxruntime's TensorRT provider. No ``trt_fp16_enable``/``trt_int8_enable``:
    with either set the provider builds a weakly typed network and may run the fp16 graphs'
    FP32 islands (LayerNorm, softmax, head) in FP16; without them its network is strongly
    typed and every tensor keeps the graph's type. Engines it builds are cached in
    ``cache_dir`` when there is one."""
    options: dict[str, Any] = {}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    return options


def _trt_cache_dir() -> Path | None:
    cache = Path(os.environ.get("CLIPLLAMA_TRT_CACHE", Path.home() / ".cache" / "clipllama" / "trt"))
    try:  # engines built by the provider are cached between runs when there is a writable place
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache


class OrtBackend:
    """The bundle's ONNX graphs of one precision in onnxruntime sessions.

    ``name`` says which provider onnxruntime started (it falls back silently when the
    TensorRT or CUDA provider cannot start); ``notes`` says why a requested one is not used.
    With ``strict`` a TensorRT provider known not to start is an error instead of a note.
    """

    def __init__(self, bundle: Bundle, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, graphs: tuple[str, ...] = GRAPH_NAMES, strict: bool = False) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing and missing[0] == wanted[0]:
            problem = ort_gpu_problem(available) if wanted[0] != "CPUExecutionProvider" else None
            raise BackendError(f"onnxruntime provider {wanted[0]} is not available "
                               f"(available: {', '.join(available)})" + (f": {problem}" if problem else ""))
        self.notes: list[str] = []
        self.requested = [p for p in wanted if p in available]
        if self.requested[0] == "TensorrtExecutionProvider":
            problem = trt_provider_problem(trt_provider_needs(getattr(ort, "__file__", None)), *tensorrt_status())
            if problem:
                if strict or len(self.requested) == 1:
                    raise BackendError(problem)
                self.notes.append(f"onnxruntime's TensorRT provider not used: {problem}")
                self.requested = self.requested[1:]
        self.providers = self.requested
        self.precision = precision
        options = session_options(threads)
        on_cpu = self.requested[0] == "CPUExecutionProvider"
        image = int8_variant(bundle) if on_cpu and precision == "int8" else precision  # the graph this CPU reads
        self.specs = {name: bundle.graph(image if name == "image_encoder" else precision, name) for name in graphs}
        if image == INT8_NO_VNNI and "image_encoder" in self.specs:
            self.notes.append(f"this CPU has no VNNI: reading with the int8 image encoder made for such CPUs "
                              f"({self.specs['image_encoder'].file})")
        self.sessions: dict[str, Any] = {}
        # onnxruntime 1.31's CPU NchwcTransformer segfaults on the fp16 graphs (level ALL)
        disabled = ["NchwcTransformer"] if precision == "fp16" else None
        provider_options = self._provider_options()
        for name, spec in self.specs.items():
            try:
                self.sessions[name] = ort.InferenceSession(
                    str(bundle.path(spec.file)), sess_options=options,
                    providers=provider_options, disabled_optimizers=disabled,
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{spec.file}: onnxruntime cannot load it ({exc})") from exc
        self.in_use = {name: _first_provider(session, self.requested) for name, session in self.sessions.items()}
        started = sorted({ort_name(p) for p in self.in_use.values()}) or [ort_name(self.requested[0])]
        self.name = "+".join(started)
        if self.sessions and ort_name(self.requested[0]) not in started:
            self.notes.append(f"onnxruntime could not start {self.requested[0]} (its log says why); "
                              f"running on {self.name}")

    def _provider_options(self) -> list[Any]:
        return [(p, tensorrt_provider_options(_trt_cache_dir())) if p == "TensorrtExecutionProvider" else p
                for p in self.requested]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        values = self.sessions[graph].run([t.name for t in spec.outputs], cast_feeds(spec, feeds))
        return _float32({t.name: v for t, v in zip(spec.outputs, values)})

    def close(self) -> None:
        self.sessions.clear()


def _first_provider(session: Any, requested: list[str]) -> str:
    """The provider a session runs on first (onnxruntime's own list; the request without one)."""
    try:
        providers = list(session.get_providers())
    except Exception:  # a session stand-in without the method
        providers = []
    return providers[0] if providers else requested[0]


# -- TensorRT -------------------------------------------------------------------------


def _cudart() -> Any:
    """cuda-python's runtime module, or a one-line error naming the extra."""
    try:
        return load_cudart()
    except ImportError:
        raise BackendError(f"the TensorRT backend needs cuda-bindings ({TRT_EXTRA})") from None


def _check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(getattr(error, "value", error)) != 0:
        raise BackendError(f"CUDA error {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_status(device: int = 0) -> GpuProbe:
    """This machine's CUDA device 0 (compute capability) or why there is none."""
    return probe_gpu(device)


def gpu_compute_capability(device: int = 0) -> str | None:
    """``"major.minor"`` of a CUDA device, or None (:func:`gpu_status` says why)."""
    return gpu_status(device).compute_capability


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None (``runtime.gpu.tensorrt_status`` says why)."""
    return tensorrt_status()[0]


def normalize_cc(value: str) -> str:
    """``"8.9"``, ``"89"``, ``"sm89"``, ``"sm_89"`` -> ``"8.9"``."""
    text = str(value).lower().removeprefix("sm").strip("_")
    if "." in text:
        return text
    return f"{text[:-1]}.{text[-1]}" if len(text) >= 2 else text


def same_trt_version(a: str, b: str) -> bool:
    """Engines are tied to the TensorRT build: compare major.minor.patch."""
    return a.split(".")[:3] == b.split(".")[:3]


def engine_mismatch(engine: EngineSpec, cc: str | None, trt_version: str | None,
                    gpu_reason: str | None = None, trt_reason: str | None = None) -> str | None:
    """Why ``engine`` cannot run here (None when it can); ``gpu_reason``/``trt_reason`` say
    why there is no GPU or no TensorRT."""
    if cc is None:
        return f"no usable CUDA GPU ({gpu_reason})" if gpu_reason else "no CUDA GPU"
    if trt_version is None:
        return trt_reason or f"TensorRT is not installed ({TRT_EXTRA})"
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
        if not ctx.execute_async_v3(trt_api.stream_handle(stream)):
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
            raise BackendError(f"the TensorRT backend needs the tensorrt package ({TRT_EXTRA})") from None
        self.cudart = _cudart()
        self.notes: list[str] = []
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
        unique = {id(b): b for b in routes.values()}.values()
        self.notes = [n for b in unique for n in getattr(b, "notes", [])]
        names = sorted({b.name for b in routes.values()})
        self.name = "+".join(names)
        self.precision = "/".join(sorted({b.precision for b in routes.values()}))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.routes[graph].run(graph, feeds)

    def close(self) -> None:
        for backend in {id(b): b for b in self.routes.values()}.values():
            backend.close()


class RecheckedBackend:
    """The int8 (static, fixed-scale) image encoder; the fp32 graphs for the rest and for
    crops read again (:meth:`run_reference`). The dynamic int8 text encoder is not used: its
    scales come from each batch, so a word would read differently in another batch. Below
    which CTC confidence a crop is read again: ``below_confidence`` (:func:`recheck_threshold`)."""

    def __init__(self, fast: Backend, reference: Backend, below_confidence: float) -> None:
        self.fast, self.reference = fast, reference
        self.below_confidence = below_confidence
        self.name = fast.name
        self.precision = RECHECKED
        self.notes = list(getattr(fast, "notes", []))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return (self.fast if graph == "image_encoder" else self.reference).run(graph, feeds)

    def run_reference(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.reference.run(graph, feeds)

    def close(self) -> None:
        self.fast.close()
        self.reference.close()


def recheck_threshold(bundle: Bundle) -> float:
    """The bundle's ``defaults.int8_recheck.below_confidence`` (``int8_no_vnni_recheck`` where
    this CPU reads the no-VNNI image encoder: :func:`int8_variant`; chosen on validation data by
    ``python -m export.recheck``); ``BundleError`` when it has none or no int8 and fp32 graphs."""
    missing = [p for p in ("int8", "fp32") if p not in bundle.precisions]
    if missing:
        raise BundleError(f"{bundle.root}: --precision {RECHECKED} needs int8 and fp32 graphs "
                          f"(has {', '.join(bundle.precisions)})")
    if not bundle.decode.ctc_rescoring:
        raise BundleError(f"{bundle.root}: --precision {RECHECKED} needs an image encoder with a CTC head "
                          "(its confidence decides which crops are read again)")
    key = RECHECK_KEYS[int8_variant(bundle)]
    defaults = bundle.manifest.get("defaults")
    recheck = defaults.get(key) if isinstance(defaults, dict) else None
    value = recheck.get("below_confidence") if isinstance(recheck, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise BundleError(f"{bundle.root}: --precision {RECHECKED} needs defaults.{key}.below_confidence "
                          f"in its manifest (python -m export.recheck {bundle.root}, run on this kind of CPU, "
                          "chooses it)")
    return float(value)


# -- selection ------------------------------------------------------------------------


def matching_engines(bundle: Bundle, precision: str, warn: bool = True,
                     notes: list[str] | None = None) -> dict[str, EngineSpec]:
    """Engines of ``precision`` that can run on this machine, by graph. Why the others
    cannot: one line per reason, appended to ``notes`` when given, else a warning (when
    ``warn`` and there is a GPU)."""
    if not bundle.engines:
        return {}
    gpu = gpu_status()
    version, trt_reason = tensorrt_status()
    found: dict[str, EngineSpec] = {}
    unusable: dict[str, list[str]] = {}
    for engine in bundle.engines:
        if engine.precision != precision or engine.graph in found:
            continue
        reason = engine_mismatch(engine, gpu.compute_capability, version, gpu.reason, trt_reason)
        if reason is None:
            found[engine.graph] = engine
        else:
            unusable.setdefault(reason, []).append(engine.file)
    for reason, files in unusable.items():
        files = [f for f in files if Path(f).name.split(".")[0] not in found] or files
        line = f"TensorRT engine{'s' if len(files) > 1 else ''} {', '.join(files)} not usable here ({reason})"
        if notes is not None:
            notes.append(line + "; using the ONNX graphs")
        elif warn and gpu.compute_capability is not None:
            warnings.warn(line + "; using the ONNX graph instead", RuntimeWarning, stacklevel=3)
    return found


def _ort_best(bundle: Bundle, precision: str, threads: int | None, gpu: GpuProbe, notes: list[str]) -> Backend:
    """onnxruntime with the fastest provider that starts; ``notes`` get why the others did not."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if gpu.absent:
        notes.append(f"onnxruntime runs on the CPU, as there is no NVIDIA GPU: {gpu.reason}")
    elif problem := ort_gpu_problem(available):
        notes.append(f"onnxruntime runs on the CPU: {problem}")
    else:
        for name in ("ort-trt", "ort-cuda"):
            if _ORT_PROVIDERS[name][0] not in available:
                continue
            try:
                backend = OrtBackend(bundle, precision, _ORT_PROVIDERS[name], threads)
            except BackendError as exc:
                notes.append(f"{name} failed ({exc}); trying the next provider")
                continue
            backend.notes[:0] = notes
            return backend
    backend = OrtBackend(bundle, precision, _ORT_PROVIDERS["ort-cpu"], threads)
    backend.notes[:0] = notes
    return backend


def _ort_gpu_available() -> bool:
    import onnxruntime as ort

    return any(_ORT_PROVIDERS[n][0] in ort.get_available_providers() for n in ("ort-trt", "ort-cuda"))


#: the ``weights`` a static int8 graph's manifest record names when every weight is 7-bit
#: (``export.onnx --reduce-range``, written by ``export.static_int8``): x86 CPUs without VNNI
#: multiply uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit pair sums
#: saturate for 8-bit weights (255 * 127 * 2 > 32767) but not for 7-bit ones (255 * 63 * 2)
WEIGHTS_7BIT = "int7 per channel (reduce_range)"


#: a serialized ONNX graph (``y = MatMulInteger(a, b)``, ``a`` uint8 [1, 64], ``b`` the int8
#: constant 127 of shape [64, 1]; made with ``onnx.helper``, which the runtime does not need;
#: tests/test_int8_saturation.py rebuilds and compares it)
INT8_PROBE_ONNX = (
    "CAgSCWNsaXBsbGFtYTqdAQoYCgFhCgFiEgF5Ig1NYXRNdWxJbnRlZ2VyEgppbnQ4X3Byb2JlKksIQAgBEAMqQH9/f39/f39/f39/"
    "f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39CAWJaEwoBYRIOCgwIAhIICgIIAQoC"
    "CEBiEwoBeRIOCgwIBhIICgIIAQoCCAFCBAoAEA0="
)


@functools.cache
def int8_dot_saturates() -> bool:
    """Whether onnxruntime's CPU kernels for uint8 x int8 products saturate on this CPU.

    x86 CPUs without VNNI multiply with VPMADDUBSW, whose 16-bit sums of two products
    overflow for 8-bit weights (255 * 127 * 2 > 32767); an int8 graph quantized for a VNNI
    CPU then reads several points worse (docs/int8.md). :data:`INT8_PROBE_ONNX`, whose exact
    answer (255 * 127 * 64) such a kernel cannot reach, tells."""
    import base64

    import onnxruntime as ort

    try:
        session = ort.InferenceSession(base64.b64decode(INT8_PROBE_ONNX), sess_options=session_options(1),
                                       providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"a": np.full((1, 64), 255, np.uint8)})
    except Exception:  # a build without the kernel: nothing to say about it
        return False
    return int(np.asarray(out).reshape(-1)[0]) != 255 * 127 * 64


def int8_variant(bundle: Bundle) -> str:
    """Which int8 image encoder this CPU reads: :data:`INT8_NO_VNNI` where its int8 products
    saturate and the bundle has one made for such CPUs, else ``int8``."""
    if "image_encoder" in bundle.graphs.get(INT8_NO_VNNI, {}) and int8_dot_saturates():
        return INT8_NO_VNNI
    return "int8"


def int8_saturation_problem(bundle: Bundle) -> str | None:
    """Why the int8 image encoder this CPU reads (:func:`int8_variant`) reads worse here than
    where it was chosen (8-bit weights on a CPU whose int8 products saturate, unless the
    export validated it on such a CPU: ``quantization.saturation.cpu_saturates``), or None."""
    entry = bundle.manifest.get("graphs", {}).get(int8_variant(bundle), {}).get("image_encoder")
    record = entry.get("quantization") if isinstance(entry, dict) else None
    if not isinstance(record, dict) or record.get("mode") != "static":
        return None
    saturation = record.get("saturation")  # figures measured with saturating kernels hold here
    checked = isinstance(saturation, dict) and saturation.get("cpu_saturates") is True
    if checked or record.get("weights") == WEIGHTS_7BIT or not int8_dot_saturates():
        return None
    return ("this CPU has no VNNI, so its 8-bit integer products saturate, and the bundle's int8 image encoder "
            "has 8-bit weights validated on a CPU where they do not (export.onnx BUNDLE --precision int8 "
            "--no-vnni --weights-7bit first-conv --calibration ... --validation ..., run on a CPU like this one, "
            "adds one for it: docs/int8.md)")


def cpu_precision(bundle: Bundle, notes: list[str] | None = None) -> str:
    """The bundle's precision for a CPU: its manifest's ``defaults.cpu_precision`` when the
    bundle has that variant (the export sets int8 there only when int8 read within its
    tolerance of fp32 on every validation set) and this CPU computes its int8 graph as it
    was measured (:func:`int8_saturation_problem`; else a note in ``notes``), else fp32."""
    defaults = bundle.manifest.get("defaults")
    wanted = defaults.get("cpu_precision") if isinstance(defaults, dict) else None
    if wanted in ("int8", RECHECKED):
        problem = int8_saturation_problem(bundle)
        if problem is not None:
            if notes is not None:
                notes.append(f"reading in fp32, not the bundle's {wanted}: {problem}")
            wanted = None
    if wanted in bundle.precisions:
        return str(wanted)
    if wanted == RECHECKED:
        try:
            recheck_threshold(bundle)
        except BundleError as exc:
            if notes is not None:
                notes.append(f"reading in fp32, not the bundle's {RECHECKED}: {exc}")
        else:
            return RECHECKED
    return "fp32" if "fp32" in bundle.precisions else bundle.precisions[0]


def default_precision(bundle: Bundle, backend: str, notes: list[str] | None = None) -> str:
    """fp16 where a GPU runs it and the bundle has it, else the bundle's CPU precision
    (:func:`cpu_precision`; fp16 on a CPU is slow; why not int8 goes to ``notes``)."""
    if backend in ("trt", "ort-trt", "ort-cuda"):
        gpu = True
    elif backend == "auto" and gpu_status().compute_capability is not None:
        gpu = _ort_gpu_available() or bool(matching_engines(bundle, "fp16", warn=False))
    else:
        gpu = False
    if gpu and ("fp16" in bundle.precisions or any(e.precision == "fp16" for e in bundle.engines)):
        return "fp16"
    if gpu:  # int8 graphs are for onnxruntime on a CPU
        return "fp32" if "fp32" in bundle.precisions else bundle.precisions[0]
    return cpu_precision(bundle, notes)


def _no_engine_message(bundle: Bundle, precision: str, missing: list[str], notes: list[str]) -> str:
    """Why ``--backend trt`` cannot run, in words (no GPU, no TensorRT, no or foreign engines)."""
    head = f"no usable {precision} TensorRT engine for {', '.join(missing)}"
    if notes:
        return f"{head}: " + "; ".join(notes)
    gpu = gpu_status()
    version, trt_reason = tensorrt_status()
    why = [f"no usable CUDA GPU ({gpu.reason})"] if gpu.compute_capability is None else []
    if version is None:
        why.append(trt_reason or "tensorrt is not installed")
    if not any(e.precision == precision for e in bundle.engines):
        why.append(f"the bundle has no {precision} engines (python -m export.trt {bundle.root}"
                   f"{' --fp16' if precision == 'fp16' else ''} builds them on the GPU they run on)")
    return f"{head}: " + "; ".join(why)


def select_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                   threads: int | None = None) -> Backend:
    """Create the backend ``backend`` (see :data:`BACKENDS`) for ``bundle``.

    The result's ``name`` is what runs (``ort-cuda`` when onnxruntime fell back from its
    TensorRT provider, ``trt+ort-cpu`` for engines plus ONNX graphs); its ``notes`` say why
    each faster way was not taken, and ``gpu_absent`` whether this machine simply has no
    NVIDIA GPU (then the notes are only for the curious); its ``warnings`` what a user must
    hear whatever the machine (an int8 graph this CPU computes worse than where it was chosen).
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if precision is not None and precision not in PRECISION_CHOICES:
        raise BackendError(f"unknown precision {precision!r} (choose from {', '.join(PRECISION_CHOICES)})")
    warned = precision_warnings(bundle, backend, precision)
    chosen = _select(bundle, backend, precision, threads)
    chosen.warnings = warned
    return chosen


def precision_warnings(bundle: Bundle, backend: str = "auto", precision: str | None = None) -> list[str]:
    """What a user asking for ``precision`` must hear whatever the machine: an int8 graph
    this CPU computes worse than where it was chosen (:func:`int8_saturation_problem`)."""
    if precision not in ("int8", RECHECKED) or backend not in ("auto", "ort-cpu"):
        return []
    problem = int8_saturation_problem(bundle)
    if problem is None:
        return []
    return [f"--precision {precision} reads worse here than where it was measured: {problem}"]


def _select(bundle: Bundle, backend: str, precision: str | None, threads: int | None) -> Backend:
    """:func:`select_backend` once the arguments are checked."""
    notes: list[str] = []
    if precision in (None, "auto"):
        precision = default_precision(bundle, backend, notes)
    if precision == RECHECKED:
        return _rechecked(bundle, backend, threads, notes)
    if precision not in bundle.graphs and not any(e.precision == precision for e in bundle.engines):
        raise BundleError(f"{bundle.root}: no {precision} variant (has {', '.join(bundle.precisions)})")
    if backend == "trt":
        engines = matching_engines(bundle, precision, notes=notes)
        missing = [g for g in GRAPH_NAMES if g not in engines]
        if missing:
            raise BackendError(_no_engine_message(bundle, precision, missing, notes))
        return _mark(TensorRTBackend(bundle, engines), notes, False)
    if backend in _ORT_PROVIDERS:
        return _mark(OrtBackend(bundle, precision, _ORT_PROVIDERS[backend], threads, strict=True), notes, False)
    gpu = gpu_status()
    engines = matching_engines(bundle, precision, notes=notes)
    if engines:
        try:
            trt_backend = TensorRTBackend(bundle, engines)
        except BackendError as exc:
            notes.append(f"TensorRT engines not used ({exc}); using onnxruntime")
        else:
            rest = tuple(g for g in GRAPH_NAMES if g not in engines)
            if not rest:
                return _mark(trt_backend, notes, False)
            if precision not in bundle.precisions:
                raise BackendError(f"no ONNX {precision} graphs for {', '.join(rest)}")
            ort_backend = _ort_best(bundle, precision, threads, gpu, notes)
            return _mark(RoutedBackend({g: trt_backend if g in engines else ort_backend for g in GRAPH_NAMES}),
                         [], False)
    elif gpu.compute_capability is not None and not bundle.engines:
        notes.append(f"the bundle has no TensorRT engines (python -m export.trt {bundle.root} --fp16 builds them)")
    elif gpu.compute_capability is None and not gpu.absent and not bundle.engines:
        notes.append(f"no usable CUDA GPU: {gpu.reason}")
    return _mark(_ort_best(bundle, precision, threads, gpu, notes), [], gpu.absent)


def _rechecked(bundle: Bundle, backend: str, threads: int | None, notes: list[str] | None = None) -> Backend:
    """:class:`RecheckedBackend` on onnxruntime's CPU provider (int8 graphs are for a CPU)."""
    below = recheck_threshold(bundle)
    if backend not in ("auto", "ort-cpu"):
        raise BackendError(f"--precision {RECHECKED} runs on onnxruntime's CPU provider only "
                           f"(--backend auto or ort-cpu, not {backend})")
    gpu = gpu_status()
    notes = list(notes or [])
    if gpu.absent:
        notes.insert(0, f"onnxruntime runs on the CPU, as there is no NVIDIA GPU: {gpu.reason}")
    fast = OrtBackend(bundle, "int8", _ORT_PROVIDERS["ort-cpu"], threads, graphs=("image_encoder",))
    reference = OrtBackend(bundle, "fp32", _ORT_PROVIDERS["ort-cpu"], threads)
    return _mark(RecheckedBackend(fast, reference, below), notes, gpu.absent)


def _mark(backend: Any, notes: list[str], gpu_absent: bool) -> Any:
    """Attach the selection's notes (once) and whether the machine has no GPU at all."""
    own = getattr(backend, "notes", None)
    if own is None:
        backend.notes = list(notes)
    else:
        backend.notes[:0] = [n for n in notes if n not in own]
    backend.gpu_absent = gpu_absent
    return backend
