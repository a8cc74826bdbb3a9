"""Questions about an exported model's ONNX IR: tensor bytes, op counts, opset, weight dtype."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnxscript import ir

from bnfold.onnx_ir import count_ops, onnx_opset, tensor_bytes, weight_dtype


def ir_model(nodes: list[onnx.NodeProto], initializers: list[np.ndarray], opset: int = 18, functions=()) -> ir.Model:
    """A one-input, one-output model around ``nodes`` with initializers ``w0``, ``w1``, ..."""
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(initializers)],
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], functions=list(functions)
    )
    return ir.serde.deserialize_model(proto)


def test_tensor_bytes_counts_initializers_and_constant_attributes():
    constant = onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(8, np.float64)))
    model = ir_model([constant, onnx.helper.make_node("MatMul", ["x", "w0"], ["y"])], [np.ones((4, 4), np.float32)])
    assert tensor_bytes(model) == 4 * 4 * 4 + 8 * 8


def test_count_ops_looks_into_subgraphs_and_functions_of_the_onnx_domain_only():
    def bn(output: str) -> onnx.NodeProto:
        return onnx.helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], [output])

    branch = onnx.helper.make_graph([bn("by")], "branch", [], [onnx.helper.make_tensor_value_info("by", 1, [1, 4])])
    if_node = onnx.helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)
    custom = onnx.helper.make_node("BatchNormalization", ["x"], ["c"], domain="my.domain")
    function = onnx.helper.make_function(
        "local", "f", ["x", "s", "b", "m", "v"], ["y"], [bn("y")], [onnx.helper.make_opsetid("", 18)]
    )
    model = ir_model([bn("y"), if_node, custom], [], functions=[function])
    assert count_ops(model, "BatchNormalization") == 1 + 2 + 1  # graph, both branches, the function
    assert count_ops(model, "If") == 1 and count_ops(model, "Conv") == 0


@pytest.mark.parametrize("opset", [17, 20])
def test_onnx_opset_is_the_default_domains(opset):
    assert onnx_opset(ir_model([onnx.helper.make_node("Relu", ["x"], ["y"])], [], opset=opset)) == opset


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ([np.float32, np.int64], "float32"),
        ([np.float32, np.float16], "float16"),
        ([np.float64], "float64"),
        ([np.int64], "none"),
        ([], "none"),
    ],
)
def test_weight_dtype_is_the_narrowest_floating_point_initializer(dtypes, expected):
    model = ir_model([onnx.helper.make_node("Relu", ["x"], ["y"])], [np.ones(3, d) for d in dtypes])
    assert weight_dtype(model) == expected
