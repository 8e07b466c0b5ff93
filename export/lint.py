"""Graph lint: the TensorRT rules of DESIGN.md, checked on an exported ONNX graph.

    python -m export.lint BUNDLE_OR_ONNX... [--json]

Rules (each finding names its rule):

``opset``
    The default-domain opset is at least 17 (LayerNormalization exists as one op).
``control-flow``
    No ``Loop``, ``If`` or ``Scan`` node and no node carrying a subgraph: the AR loops
    are unrolled, nothing branches on data.
``argmax-1d``
    Every ``ArgMax``/``ArgMin`` reads a tensor of rank >= 2 and yields one of rank >= 2
    (``keepdims`` counted), and no ``Squeeze``/``Reshape``/``Flatten`` directly after it
    makes its result rank < 2. A rank that shape inference cannot tell is a finding too.
``cumsum-type``
    ``CumSum`` runs on float32, float16 or int32 data: never bool (cast to int first) and
    never int64.
``int64``
    A tensor computed at run time is int64 only when it is a graph input, a shape
    computation (computed only from ``Shape``/``Size`` outputs and constants), or the int64
    output of ``ArgMax``/``ArgMin``/``TopK``/``NonZero`` whose every consumer is a ``Cast``
    to another type. Constants (initializers, ``Constant`` nodes) are weights, not run-time
    data, and are not findings. Token ids in the decoders are int32.
``layernorm``
    At least one ``LayerNormalization`` node (``min_layernorms``), and no decomposed
    LayerNorm (a ``ReduceMean`` whose result is subtracted from its own input).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

MIN_OPSET = 17
CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})
_INT64_PRODUCERS = {"ArgMax": 0, "ArgMin": 0, "TopK": 1, "NonZero": 0}
_CUMSUM_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32})
_RESHAPERS = frozenset({"Squeeze", "Reshape", "Flatten"})


@dataclass(frozen=True)
class Finding:
    """One rule broken at one place of a graph."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


class _Info:
    """Types, ranks, producers and consumers of a graph's tensors (after shape inference)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.elem: dict[str, int] = {}
        self.rank: dict[str, int] = {}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type:
                self.elem[value.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                self.rank[value.name] = len(tensor_type.shape.dim)
        self.constants: set[str] = set()
        for init in graph.initializer:
            self.constants.add(init.name)
            self.elem[init.name] = init.data_type
            self.rank[init.name] = len(init.dims)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            if node.op_type == "Constant":
                self.constants.update(node.output)
                for attr in node.attribute:
                    if attr.name == "value":
                        self.elem[node.output[0]] = attr.t.data_type
                        self.rank[node.output[0]] = len(attr.t.dims)
        self.inputs = {value.name for value in graph.input} - self.constants


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {', '.join(node.output)}>"


def _check_opset(model: onnx.ModelProto) -> list[Finding]:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    version = max(versions, default=0)
    if version < MIN_OPSET:
        return [Finding("opset", "model", f"opset {version} < {MIN_OPSET} (LayerNorm would not be one node)")]
    return []


def _check_control_flow(model: onnx.ModelProto) -> list[Finding]:
    found = []
    for node in model.graph.node:
        has_graph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if node.op_type in CONTROL_FLOW_OPS or has_graph:
            found.append(Finding("control-flow", _name(node), f"{node.op_type} node (data-dependent control flow)"))
    return found


def _check_argmax(model: onnx.ModelProto, info: _Info) -> list[Finding]:
    found = []
    for node in model.graph.node:
        if node.op_type not in ("ArgMax", "ArgMin"):
            continue
        rank = info.rank.get(node.input[0])
        if rank is None:
            found.append(Finding("argmax-1d", _name(node), "input rank unknown (cannot show it is >= 2)"))
            continue
        out_rank = rank if _attr(node, "keepdims", 1) else rank - 1
        if rank < 2 or out_rank < 2:
            found.append(Finding("argmax-1d", _name(node),
                                 f"{node.op_type} on a rank-{rank} tensor gives rank {out_rank} (need >= 2)"))
            continue
        for consumer in info.consumers.get(node.output[0], []):
            if consumer.op_type in _RESHAPERS:
                squeezed = info.rank.get(consumer.output[0])
                if squeezed is None or squeezed < 2:
                    found.append(Finding("argmax-1d", _name(consumer),
                                         f"{consumer.op_type} after {node.op_type} makes it rank "
                                         f"{'unknown' if squeezed is None else squeezed}"))
    return found


def _check_cumsum(model: onnx.ModelProto, info: _Info) -> list[Finding]:
    found = []
    for node in model.graph.node:
        if node.op_type == "CumSum":
            elem = info.elem.get(node.input[0])
            if elem not in _CUMSUM_TYPES:
                kind = TensorProto.DataType.Name(elem) if elem else "unknown"
                found.append(Finding("cumsum-type", _name(node), f"CumSum on {kind} data (cast to int32 first)"))
    return found


def _shape_derived(model: onnx.ModelProto, info: _Info) -> set[str]:
    """Tensors computed only from ``Shape``/``Size`` outputs and constants."""
    derived = set(info.constants)
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type in ("Shape", "Size") or node.input and all(not name or name in derived for name in node.input):
            derived.update(node.output)
    return derived


def _check_int64(model: onnx.ModelProto, info: _Info) -> list[Finding]:
    derived = _shape_derived(model, info)
    found = []
    for node in model.graph.node:
        for index, out in enumerate(node.output):
            if not out or info.elem.get(out) != TensorProto.INT64 or out in derived:
                continue
            if _INT64_PRODUCERS.get(node.op_type) == index:
                consumers = info.consumers.get(out, [])
                casts = [c for c in consumers if c.op_type == "Cast" and _attr(c, "to", 0) != TensorProto.INT64]
                if consumers and len(casts) == len(consumers) and out not in _graph_outputs(model):
                    continue
                found.append(Finding("int64", _name(node),
                                     f"int64 {node.op_type} output {out!r} is used without a Cast to int32"))
                continue
            found.append(Finding("int64", _name(node), f"int64 data tensor {out!r} (int32 serves)"))
    return found


def _graph_outputs(model: onnx.ModelProto) -> set[str]:
    return {value.name for value in model.graph.output}


def _check_layernorm(model: onnx.ModelProto, info: _Info, min_layernorms: int) -> list[Finding]:
    found = []
    count = sum(node.op_type == "LayerNormalization" for node in model.graph.node)
    if count < min_layernorms:
        found.append(Finding("layernorm", "model",
                             f"{count} LayerNormalization node(s), expected at least {min_layernorms}"))
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        source = node.input[0]
        for consumer in info.consumers.get(node.output[0], []):
            if consumer.op_type == "Sub" and source in consumer.input:
                found.append(Finding("layernorm", _name(node), "decomposed LayerNorm (x - ReduceMean(x))"))
    return found


def lint_model(model: onnx.ModelProto | str | Path, min_layernorms: int = 1) -> list[Finding]:
    """Every finding of every rule on ``model`` (a ModelProto or a path); empty when clean."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    info = _Info(inferred)
    return [
        *_check_opset(inferred),
        *_check_control_flow(inferred),
        *_check_argmax(inferred, info),
        *_check_cumsum(inferred, info),
        *_check_int64(inferred, info),
        *_check_layernorm(inferred, info, min_layernorms),
    ]


def _onnx_files(target: Path) -> list[Path]:
    if target.is_dir():
        manifest = target / "manifest.json"
        if manifest.is_file():
            graphs = json.loads(manifest.read_text())["graphs"]
            files = {entry["file"] for entries in graphs.values() for entry in entries.values()}
            return [target / f for f in sorted(files)]
        return sorted(target.rglob("*.onnx"))
    return [target]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.lint",
                                     description="Check ONNX graphs against the TensorRT rules (exit 1 on findings).")
    parser.add_argument("targets", nargs="+", type=Path, help="bundle directories or .onnx files")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    report: dict[str, list[dict[str, str]]] = {}
    for target in args.targets:
        if not target.exists():
            parser.error(f"{target}: no such file or directory")
        for path in _onnx_files(target):
            findings = lint_model(path)
            report[str(path)] = [asdict(f) for f in findings]
            print(f"{path}: {'ok' if not findings else f'{len(findings)} finding(s)'}")
            for finding in findings:
                print(f"  {finding}")
    if args.json:
        print(json.dumps(report))
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
