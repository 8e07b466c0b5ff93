"""FP16 and INT8 variants of the FP32 graphs.

* FP16: onnxruntime's float16 converter (``onnxruntime.transformers.float16``) with
  LayerNormalization and Softmax blocked by op type and the classifier head (plus the nodes
  that only move its logits: step concatenation, the slices the argmax reads) blocked by
  node name, so those stay FP32 (DESIGN.md: PARSeq's FP16 engine lost 8 points without
  this). The converter's ``Cast(fp16) -> Cast(fp32)`` round trips between two FP32 nodes
  are removed, so an FP32 island hands FP32 to the next one. Graph inputs and outputs stay
  float32, so the runtime feeds every precision alike.
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


def logit_nodes(model: onnx.ModelProto) -> list[str]:
    """The head nodes and every node after them that computes on the float logits
    (concatenation of the steps, the slices the argmax reads), so logits stay FP32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    heads = [node for node in graph.node if HEAD_PATTERN.search(node.name)]
    names = {node.name for node in heads}
    frontier = [out for node in heads for out in node.output]
    while frontier:
        tensor = frontier.pop()
        if elem.get(tensor) != onnx.TensorProto.FLOAT:
            continue
        for node in consumers.get(tensor, []):
            if node.name not in names:
                names.add(node.name)
                frontier.extend(node.output)
    return [node.name for node in graph.node if node.name in names]


def remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Rewire ``Cast(fp16) -> Cast(fp32)`` pairs (the converter puts one between two FP32
    nodes) to read the FP32 tensor directly; drops the casts left unused. Returns the count."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    elem.update({i.name: i.data_type for i in graph.initializer})
    outputs = {v.name for v in graph.output}
    rewired = 0
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        source = first.input[0]
        origin = producer.get(source)
        from_cast = origin is not None and origin.op_type == "Cast" and _cast_to(origin) == onnx.TensorProto.FLOAT
        if elem.get(source) != onnx.TensorProto.FLOAT and not from_cast:
            continue
        if node.output[0] in outputs:
            node.input[0] = source  # a float32 -> float32 Cast: exact
        else:
            for consumer in graph.node:
                for i, name in enumerate(consumer.input):
                    if name == node.output[0]:
                        consumer.input[i] = source
        rewired += 1
    _drop_unused_casts(model)
    return rewired


def _cast_to(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "to"), 0)


def _drop_unused_casts(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
        keep = [n for n in graph.node if n.op_type != "Cast" or n.output[0] in used]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


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


def topological_sort(model: onnx.ModelProto) -> None:
    """Order the nodes so each comes after the producers of its inputs (the float16
    converter appends its input casts at the end), keeping the order otherwise."""
    graph = model.graph
    available = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {waiting[0].name}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(src: Path, dst: Path, keep_head: bool = True) -> dict[str, int]:
    """Write the FP16 variant of ``src`` to ``dst``; returns counts of what stayed FP32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    logits = logit_nodes(model) if keep_head else []
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_OPS],
        node_block_list=logits,
    )
    drop_duplicate_nodes(converted)
    topological_sort(converted)
    rewired = remove_cast_round_trips(converted)
    onnx.save(converted, str(dst))
    kept = {op: sum(n.op_type == op for n in converted.graph.node) for op in FP16_KEEP_OPS}
    return {**kept, "head_and_logit_nodes": len(logits), "cast_round_trips_removed": rewired}


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


def rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Point every node input named in ``renamed`` at its new name."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


#: initializers smaller than this stay as they are when weights are stored in FP16
HALF_STORAGE_MIN_ELEMENTS = 4096


def store_exact_half(path: Path) -> int:
    """Store the float32 weights of the graph at ``path`` as float16 where that is exact.

    A checkpoint saved in FP16 (the shipped default) gives FP32 graphs whose weights are
    all FP16 values; storing those as float16 with a ``Cast`` to float32 halves the file
    and changes no number: the graph still computes in FP32 (onnxruntime folds the casts
    when it loads the graph). Weights that float16 cannot hold exactly are left alone, so a
    graph exported from FP32 weights is unchanged. Returns the number of initializers
    converted (the file is rewritten only when that is not 0).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    renamed: dict[str, str] = {}
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < HALF_STORAGE_MIN_ELEMENTS:
            continue
        array = numpy_helper.to_array(init)
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            continue
        init.CopyFrom(numpy_helper.from_array(half, init.name))
        renamed[init.name] = f"{init.name}__as_float32"
        casts.append(helper.make_node("Cast", [init.name], [renamed[init.name]], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__cast"))
    if not casts:
        return 0
    rename_inputs(graph, renamed)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(casts)
