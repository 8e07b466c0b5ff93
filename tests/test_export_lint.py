"""export.lint on hand-built ONNX graphs: a clean graph passes, each TensorRT rule catches its
violation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.lint import lint_model, main


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           initializers: list[onnx.TensorProto] | None = None, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                   for o in outputs], initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _float(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _layernorm(x: str, out: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    weights = [numpy_helper.from_array(np.ones(4, np.float32), "g"),
               numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    return helper.make_node("LayerNormalization", [x, "g", "b"], [out], axis=-1), weights


def _clean() -> onnx.ModelProto:
    """LayerNorm, a rank-3 ArgMax cast to int32 and an int32 CumSum: what the decoders do."""
    norm, weights = _layernorm("x", "n")
    nodes = [
        norm,
        helper.make_node("ArgMax", ["n"], ["idx64"], axis=-1, keepdims=0),
        helper.make_node("Cast", ["idx64"], ["idx"], to=TensorProto.INT32),
        helper.make_node("CumSum", ["idx", "axis"], ["c"]),
        helper.make_node("Shape", ["x"], ["shape"]),  # int64 shape computation: allowed
        helper.make_node("Reshape", ["n", "shape"], ["y"]),
    ]
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    return _model(nodes, [_float("x", ["batch", 5, 4])], ["y", "c"], [*weights, axis])


def _rules(model: onnx.ModelProto, **kwargs: int) -> set[str]:
    return {f.rule for f in lint_model(model, **kwargs)}


def test_clean_graph_passes() -> None:
    assert lint_model(_clean()) == []


def test_low_opset_is_caught() -> None:
    model = _clean()
    model.opset_import[0].version = 13
    assert "opset" in _rules(model)


def test_one_dimensional_argmax_is_caught() -> None:
    norm, weights = _layernorm("x", "n")
    flat = helper.make_node("ArgMax", ["v"], ["i"], axis=0, keepdims=1)  # rank-1 input
    model = _model([norm, flat], [_float("x", [2, 4]), _float("v", [7])], ["n", "i"], weights)
    assert "argmax-1d" in _rules(model)
    # rank 2 without keepdims: a 1-D result
    squeeze = helper.make_node("ArgMax", ["x"], ["j"], axis=-1, keepdims=0)
    model = _model([norm, squeeze], [_float("x", [2, 4])], ["n", "j"], weights)
    assert "argmax-1d" in _rules(model)


def test_squeeze_to_1d_after_argmax_is_caught() -> None:
    norm, weights = _layernorm("x", "n")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [norm, helper.make_node("ArgMax", ["n"], ["i"], axis=-1, keepdims=1),
             helper.make_node("Squeeze", ["i", "axes"], ["s"]),
             helper.make_node("Cast", ["s"], ["o"], to=TensorProto.INT32)]
    findings = lint_model(_model(nodes, [_float("x", [3, 4])], ["o"], [*weights, axes]))
    assert any(f.rule == "argmax-1d" and "Squeeze" in f.message for f in findings)


def test_cumsum_on_bool_is_caught() -> None:
    norm, weights = _layernorm("x", "n")
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    zero = numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero")
    nodes = [norm, helper.make_node("Equal", ["n", "zero"], ["eq"]), helper.make_node("CumSum", ["eq", "axis"], ["c"])]
    assert "cumsum-type" in _rules(_model(nodes, [_float("x", [2, 4])], ["c"], [*weights, axis, zero]))


def test_int64_data_tensor_is_caught() -> None:
    norm, weights = _layernorm("x", "n")
    nodes = [norm, helper.make_node("ArgMax", ["n"], ["i"], axis=-1, keepdims=1),
             helper.make_node("Add", ["i", "i"], ["twice"])]  # int64 arithmetic on data
    findings = lint_model(_model(nodes, [_float("x", [2, 4])], ["twice"], weights))
    assert {f.rule for f in findings} == {"int64"}
    cast = [norm, helper.make_node("Cast", ["n"], ["as_long"], to=TensorProto.INT64)]
    assert "int64" in _rules(_model(cast, [_float("x", [2, 4])], ["as_long"], weights))


def test_int64_graph_input_is_allowed() -> None:
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    norm, weights = _layernorm("e", "n")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), norm]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 16])
    assert lint_model(_model(nodes, [ids], ["n"], [table, *weights])) == []


def test_control_flow_is_caught() -> None:
    norm, weights = _layernorm("x", "n")
    branch = helper.make_graph([helper.make_node("Identity", ["n"], ["out"])], "branch", [],
                               [_float("out", [2, 4])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    assert "control-flow" in _rules(_model([norm, node], [_float("x", [2, 4]), cond], ["y"], weights))
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])])
    loop = helper.make_node("Loop", ["", "cond"], [], body=body)
    assert "control-flow" in _rules(_model([norm, loop], [_float("x", [2, 4]), cond], ["n"], weights))


def test_decomposed_or_missing_layernorm_is_caught() -> None:
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"]),
             helper.make_node("Sub", ["x", "mean"], ["centred"])]
    findings = lint_model(_model(nodes, [_float("x", [2, 4])], ["centred"], [axes]))
    assert [f.rule for f in findings] == ["layernorm", "layernorm"]  # none present, one decomposed
    assert _rules(_clean(), min_layernorms=2) == {"layernorm"}


def test_cli_exit_codes(tmp_path: pytest.TempPathFactory) -> None:
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_clean(), good)
    model = _clean()
    model.opset_import[0].version = 13
    onnx.save(model, bad)
    assert main([str(good)]) == 0
    assert main([str(good), str(bad), "--json"]) == 1
