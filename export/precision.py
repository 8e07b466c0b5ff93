"""FP16 and INT8 variants of the FP32 graphs.

* FP16: onnxruntime's float16 converter (``onnxruntime.transformers.float16``) with
  LayerNormalization and Softmax blocked by op type and the classifier head blocked by
  node name, so those stay FP32 (DESIGN.md: PARSeq's FP16 engine lost 8 points without
  this). Graph inputs and outputs stay float32, so the runtime feeds every precision alike.
* INT8: ``onnxruntime.quantization.quantize_dynamic`` of the two encoders (weights int8,
  activations quantized per batch at run time; ``MatMul`` with constant weights and the
  token-embedding ``Gather``). The decoders stay FP32: an int8 bundle entry points at the
  fp32 decoder files. For onnxruntime on a CPU; TensorRT engines are built from fp32/fp16.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import onnx

#: op types kept in FP32 in the FP16 variant (beyond onnxruntime's default block list)
FP16_KEEP_OPS = ("LayerNormalization", "Softmax")
#: node names of the classifier head (the wrappers call it ``head``: ``/decoder/head/MatMul``)
HEAD_PATTERN = re.compile(r"(^|/)head(_\d+)?/")
#: graphs that get dynamic INT8 quantization; the others are shared with fp32
INT8_GRAPHS = ("image_encoder", "text_encoder")
INT8_OPS = ("MatMul", "Gather")


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the classifier-head nodes (every unrolled step's copy)."""
    return [node.name for node in model.graph.node if HEAD_PATTERN.search(node.name)]


def drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove exact repeats of a node (the float16 converter inserts one identical
    ``<initializer>_cast_to_fp32`` Cast per FP32 consumer of a shared initializer, which
    breaks single assignment); returns how many were removed."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        repeats = [seen.get(out) for out in node.output]
        if node.output and all(r == key for r in repeats):
            continue
        if any(r is not None for r in repeats):
            raise ValueError(f"two different nodes write {list(node.output)}")
        seen.update(dict.fromkeys(node.output, key))
        keep.append(node)
    removed = len(model.graph.node) - len(keep)
    if removed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return removed


def to_fp16(src: Path, dst: Path, keep_head: bool = True) -> dict[str, int]:
    """Write the FP16 variant of ``src`` to ``dst``; returns counts of what stayed FP32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    heads = head_nodes(model) if keep_head else []
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_OPS],
        node_block_list=heads,
    )
    drop_duplicate_nodes(converted)
    onnx.save(converted, str(dst))
    kept = {op: sum(n.op_type == op for n in converted.graph.node) for op in FP16_KEEP_OPS}
    return {**kept, "head_nodes": len(heads)}


def to_int8(src: Path, dst: Path) -> None:
    """Write the dynamically quantized INT8 variant of ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS),
            per_channel=False, reduce_range=False, extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
