"""Questions about an exported model (ONNX IR, as ``torch.onnx.export`` returns it): its size,
its ops, its opset and the dtype of its weights."""

from __future__ import annotations

from onnxscript import ir


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the model's tensors: initializers of every graph and tensors stored in node
    attributes (``Constant`` values), which decide whether it needs external data."""
    total = sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )
    for graph in [model.graph, *model.functions.values()]:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            total += sum(
                a.value.nbytes
                for a in node.attributes.values()
                if a.type == ir.AttributeType.TENSOR and getattr(a, "value", None) is not None
            )
    return total


def count_ops(model: ir.Model, op_type: str) -> int:
    """Number of ``op_type`` nodes (default ONNX domain) in the graph, its subgraphs and its functions."""
    graphs = [model.graph, *model.functions.values()]
    return sum(
        node.op_type == op_type and node.domain in ("", "ai.onnx")
        for graph in graphs
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )


def onnx_opset(model: ir.Model) -> int:
    """The model's opset version for the default ONNX domain."""
    imports = model.opset_imports
    return imports[""] if "" in imports else imports["ai.onnx"]


def weight_dtype(model: ir.Model) -> str:
    """The narrowest floating-point dtype among the initializers of every graph, by its numpy
    name (``"float32"``, ``"float16"``, ``"bfloat16"``, ...); ``"none"`` without any."""
    dtypes = {
        v.const_value.dtype
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype.is_floating_point()
    }
    if not dtypes:
        return "none"
    return str(min(dtypes, key=lambda d: (d.bitwidth, d.name)).numpy())
