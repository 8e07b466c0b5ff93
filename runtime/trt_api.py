"""The TensorRT and cuda-python calls that differ between versions, in one place.

``export.trt`` (building engines) and ``runtime.backends`` (running them) go through these
functions, so TensorRT 10 and 11 and cuda-bindings 12 and 13 are handled here alone:

* Strong typing: every tensor keeps the type the ONNX graph gives it, so the fp16 graphs'
  FP32 islands (LayerNorm, softmax, the head) stay FP32. TensorRT 10 builds a strongly typed
  network only when asked (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); TensorRT 11
  types every network strongly and deprecates that flag (it is ignored), so it is not passed.
  No precision builder flag (FP16, INT8, ...) and no per-layer precision is ever set: they
  are weak typing, refused by a strongly typed network and removed in TensorRT 11.
* TF32 is cleared where the flag exists, so FP32 layers compute in FP32.
* A CUDA stream's native handle: cuda-bindings 12.9.1 and 13 deprecate ``int(stream)`` in
  favour of ``cuda.bindings.utils.get_cuda_native_handle``.
"""

from __future__ import annotations

from typing import Any


def major_version(trt: Any) -> int:
    """The major version of a ``tensorrt`` module (10, 11, ...)."""
    return int(str(trt.__version__).split(".")[0])


def strongly_typed_by_default(trt: Any) -> bool:
    """TensorRT 11 and later type every network strongly."""
    return major_version(trt) >= 11


def create_network(trt: Any, builder: Any) -> Any:
    """A strongly typed network definition on ``builder``."""
    if strongly_typed_by_default(trt):
        return builder.create_network(0)
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def configure(trt: Any, config: Any, workspace_bytes: int) -> None:
    """Workspace limit, TF32 off; no precision flag (the network's types decide)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)


def stream_handle(stream: Any) -> int:
    """The integer handle of a CUDA stream, as ``execute_async_v3`` takes it."""
    if isinstance(stream, int):
        return stream
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9.1: int() is the way
        return int(stream)
    return int(get_cuda_native_handle(stream))
