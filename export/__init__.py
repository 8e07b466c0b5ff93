"""Checkpoint -> bundle (``export.onnx``), its checks (``export.verify``, ``export.lint``,
``export.scale_check``) and TensorRT engines (``export.trt``).

These need the ``export`` extra (PyTorch, onnx, onnxslim, open_clip), which the runtime does
not. Run as a command (``python -m export.onnx ...``) in an install without it, a module
says so in one line and exits 2, instead of ending in an import traceback.
"""

from __future__ import annotations

from runtime.extras import refuse_missing

#: What each command needs, as (module, the package that provides it); ``export.trt`` checks its own.
NEEDS = {
    "export.onnx": (("torch", "torch"), ("onnx", "onnx"), ("onnxslim", "onnxslim"), ("open_clip", "open_clip_torch")),
    "export.verify": (("torch", "torch"), ("open_clip", "open_clip_torch")),
    "export.scale_check": (("torch", "torch"), ("onnx", "onnx"), ("open_clip", "open_clip_torch")),
    "export.lint": (("onnx", "onnx"),),
}

refuse_missing("export", NEEDS, "export")
