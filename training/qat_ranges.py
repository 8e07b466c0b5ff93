"""onnxruntime's int8 activation grid, found in PyTorch: the tensors a static QDQ graph
quantizes, their scales and zero points, and the tower's modules that compute them.

A quantization-aware run that invents its own activation ranges trains against noise the
shipped graph does not have (docs/int8.md: such a run made onnxruntime's int8 graph worse).
Here the ranges are onnxruntime's own: every ``QuantizeLinear`` on an activation of the
quantized graph gives a tensor name, a scale and a zero point; the FP32 graph the quantizer
started from (``prepared.onnx`` of ``benchmarks.int8_screen``) is run with those tensors as
outputs, and each is matched by value to an input or output of one of the tower's modules.
:func:`add_graph_fake_quant` then puts the same fake quantization there, and the trained
weights are quantized again with the same scales and zero points
(``benchmarks.int8_screen --ranges-from``), so onnxruntime runs the grid that was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from export.static_int8 import RENAMED_OUTPUT, TensorGrid, graph_grids


@dataclass(frozen=True)
class HookPoint:
    """Where a graph tensor appears in the tower: a module's first input or its output."""

    module: str
    side: str  # "in", "out" or "prebias" (a linear layer's output before its bias is added)


def graph_values(prepared_path: str | Path, names: Sequence[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """The FP32 graph's values of ``names`` (those it computes) for the input ``images``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(prepared_path))
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    source = {}  # a graph output the quantizer renamed (``out`` -> ``out_QuantizeLinear_Input``)
    for name in names:
        base = name.removesuffix(RENAMED_OUTPUT)
        if name in produced or base in produced:
            source[name] = name if name in produced else base
    existing = {o.name for o in model.graph.output}
    for name in sorted(set(source.values()) - existing):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = sorted(set(source.values()))
    values = dict(zip(wanted, session.run(wanted, {session.get_inputs()[0].name: images}), strict=True))
    return {name: values[base] for name, base in source.items()}


def module_values(tower: nn.Module, images: Tensor) -> tuple[dict[HookPoint, np.ndarray], set[str]]:
    """Every module's first input and output in one forward pass of ``tower``, and the
    names of modules called more than once (their hook would see several tensors)."""
    seen: dict[HookPoint, np.ndarray] = {}
    calls: dict[str, int] = {}
    handles = []

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], Tensor):
                seen[HookPoint(name, "in")] = args[0].detach().float().contiguous().numpy().copy()
            if isinstance(output, Tensor):
                seen[HookPoint(name, "out")] = output.detach().float().contiguous().numpy().copy()
                if isinstance(module, nn.Linear) and module.bias is not None:
                    seen[HookPoint(name, "prebias")] = (output - module.bias).detach().float().numpy().copy()
        return hook

    for name, module in tower.named_modules():
        handles.append(module.register_forward_hook(keep(name)))
    try:
        with torch.no_grad():
            tower.eval()
            tower(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen, {name for name, n in calls.items() if n > 1}


def match_points(graph: dict[str, np.ndarray], torch_values: dict[HookPoint, np.ndarray], repeated: set[str],
                 tolerance: float = 1e-3) -> dict[str, HookPoint]:
    """Each graph tensor's hook point: a module output (else its value before the bias,
    else an input) of the same shape whose values agree within ``tolerance`` of the
    tensor's largest magnitude, outputs of the deepest module first, so one tensor gets one
    fake quantization; failing that, a module input holding the same values in another
    layout (a transpose or reshape lies between: the grid carries through it)."""
    def rank(point: HookPoint) -> tuple[int, int]:
        return ({"out": 0, "prebias": 1, "in": 2}[point.side], -point.module.count("."))

    usable = [p for p in torch_values if p.module not in repeated]
    by_shape: dict[tuple[int, ...], list[HookPoint]] = {}
    by_size: dict[int, list[HookPoint]] = {}
    for point in usable:
        by_shape.setdefault(torch_values[point].shape, []).append(point)
        by_size.setdefault(torch_values[point].size, []).append(point)
    out: dict[str, HookPoint] = {}
    taken: set[HookPoint] = set()
    for name, value in graph.items():
        limit = tolerance * max(float(np.abs(value).max()), 1e-6)
        for point in sorted(by_shape.get(value.shape, []), key=rank):
            if float(np.abs(torch_values[point] - value).max()) <= limit:
                out[name] = point
                taken.add(point)
                break
    for name, value in graph.items():  # the same values in another layout
        if name in out:
            continue
        ordered = np.sort(value, axis=None)
        limit = tolerance * max(float(np.abs(value).max()), 1e-6)
        for point in sorted(by_size.get(value.size, []), key=rank):
            if point.side == "in" and point not in taken and \
                    float(np.abs(np.sort(torch_values[point], axis=None) - ordered).max()) <= limit:
                out[name] = point
                taken.add(point)
                break
    return out


def fake_quant_bias(bias: Tensor) -> Tensor:
    """A linear layer's bias as onnxruntime's quantizer stores it when the bias is an input
    of a quantized Add: uint8 per tensor, the range from the values (zero included)."""
    low, high = min(float(bias.detach().min()), 0.0), max(float(bias.detach().max()), 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return torch.fake_quantize_per_tensor_affine(bias, scale, int(round(-low / scale)), 0, 255)


class FixedFakeQuant:
    """A forward (pre-)hook: the tensor through 8-bit fake quantization on a fixed grid
    (gradients pass straight through inside the range); at a ``prebias`` point the bias
    is added fake-quantized too (:func:`fake_quant_bias`), as the graph's Add sees it."""

    def __init__(self, grid: TensorGrid, side: str) -> None:
        self.grid, self.side = grid, side

    def _quantize(self, x: Tensor) -> Tensor:
        g = self.grid
        return torch.fake_quantize_per_tensor_affine(x, g.scale, g.zero_point, g.low, g.high)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        if self.side == "in":
            return (self._quantize(args[0]), *args[1:])
        if self.side == "prebias":
            return self._quantize(output - module.bias) + fake_quant_bias(module.bias)
        return self._quantize(output)


def add_graph_fake_quant(tower: nn.Module, grids: dict[str, TensorGrid],
                         points: dict[str, HookPoint]) -> list[Any]:
    """Fake quantization at each matched point with its graph's grid; the hook handles."""
    modules = dict(tower.named_modules())
    handles = []
    order = {"in": 0, "prebias": 1, "out": 2}  # a linear layer's bias is added before its output is quantized
    for name, point in sorted(points.items(), key=lambda item: order[item[1].side]):
        hook = FixedFakeQuant(grids[name], point.side)
        module = modules[point.module]
        if point.side == "in":
            handles.append(module.register_forward_pre_hook(hook))
        else:
            handles.append(module.register_forward_hook(hook))
    return handles


def graph_fake_quant(tower: nn.Module, qdq_path: Path, prepared_path: Path,
                     images: np.ndarray) -> tuple[list[Any], dict[str, Any]]:
    """Match ``qdq_path``'s 8-bit activations to ``tower`` (on the probe batch ``images``)
    and hook fake quantization there; the handles and a report (matched, unmatched)."""
    grids = graph_grids(qdq_path)
    graph = graph_values(prepared_path, list(grids), images)
    values, repeated = module_values(tower, torch.from_numpy(images))
    points = match_points(graph, values, repeated)
    handles = add_graph_fake_quant(tower, grids, points)
    report = {"quantized_tensors": len(grids), "matched": len(points), "points": points,
              "unmatched": sorted(set(grids) - set(points))}
    return handles, report
