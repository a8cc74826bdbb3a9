"""Write an exported model (ONNX IR, as ``torch.onnx.export`` returns it) to disk without
holding a second serialized copy of its weights in memory."""

from __future__ import annotations

import os
from typing import IO

import onnx
from onnxscript import ir


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (the model's weights)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


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


def _without_initializers(model: ir.Model) -> bytes:
    """The serialized model minus its main graph's initializers (the model is left as it was)."""
    initializers = dict(model.graph.initializers)
    model.graph.initializers.clear()
    try:
        return ir.serde.serialize_model(model).SerializeToString()
    finally:
        model.graph.initializers.update(initializers)


def _initializer(value: ir.Value) -> bytes:
    """A serialized ``ModelProto`` whose graph holds only the initializer ``value``."""
    value.const_value.name = value.name
    piece = onnx.ModelProto()
    ir.serde.serialize_tensor_into(piece.graph.initializer.add(), from_=value.const_value)
    return piece.SerializeToString()


def write_model(model: ir.Model, fh: IO[bytes]) -> None:
    """Write ``model`` as one ``.onnx`` file (weights inside) to the open binary file ``fh``.

    The file is the model without its initializers followed by one ``ModelProto`` per
    initializer. Protobuf parses concatenated messages as one merged message (repeated fields
    append, in order), so the file reads back as the whole model, while only one tensor is
    serialized at a time: writing needs memory for the largest tensor, not two copies of the
    whole model. The model must stay under protobuf's 2 GiB limit; see
    :func:`save_with_external_data` for larger ones.
    """
    fh.write(_without_initializers(model))
    for value in list(model.graph.initializers.values()):
        if value.const_value is not None:
            fh.write(_initializer(value))


def save_with_external_data(model: ir.Model, path: str | os.PathLike[str], location: str) -> None:
    """Write ``model`` to ``path`` with its tensors in the file ``location`` (relative to
    ``path``'s folder); each tensor is streamed to that file by ONNX IR."""
    ir.save(model, path, external_data=location)


def release_weights(model: ir.Model) -> None:
    """Drop ``model``'s references to its weight tensors once it is written.

    onnxscript's rewriter (run by ``torch.onnx.export(optimize=True)``) keeps the last node it
    matched in a module-level rule, and through it the whole IR graph, until the next export; the
    graph's initializers share memory with the folded module's weights, which would stay alive
    beside ONNX Runtime's copy during verification.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = None
