"""Write an exported model (ONNX IR, as ``torch.onnx.export`` returns it) to disk without
holding a second serialized copy of its weights in memory.

Worth its code: ``ROUNDS=5 python benchmarks/export_cost.py`` (ResNet-50, 2-core CPU) measures a
peak of 512 MB added by the whole export with this writer and 734 MB with one serialization of
the model (memory ratio to a bare ``torch.onnx.export`` 1.37 vs 1.96).
"""

from __future__ import annotations

import logging
import os
from typing import IO

import onnx
from onnxscript import ir

from .protobuf_wire import GRAPH_FIELD, INITIALIZER_FIELD, field_header


def _model_and_graph_without_tensors(model: ir.Model) -> tuple[bytes, bytes]:
    """The serialized model minus its graph, and its main graph minus the initializers' tensors
    (their names, types and value_info stay), leaving the model as it was."""
    values = list(model.graph.initializers.values())
    tensors = [v.const_value for v in values]
    serde_log = logging.getLogger(ir.serde.__name__)
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # it warns once per initializer without a tensor
    try:
        for value in values:
            value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        serde_log.setLevel(level)
        for value, tensor in zip(values, tensors):
            value.const_value = tensor
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    return proto.SerializeToString(), graph


def _initializer(value: ir.Value) -> bytes:
    """The serialized ``TensorProto`` of the initializer ``value``."""
    value.const_value.name = value.name
    proto = onnx.TensorProto()
    ir.serde.serialize_tensor_into(proto, from_=value.const_value)
    return proto.SerializeToString()


def write_model(model: ir.Model, fh: IO[bytes]) -> None:
    """Write ``model`` as one ``.onnx`` file (weights inside) to the open binary file ``fh``.

    The bytes are those of one ``ModelProto`` with one ``graph`` field, but the weights are
    serialized one tensor at a time: the graph's length is summed from each initializer's size
    first, then the graph without the initializers' tensors is written, followed by each initializer. Writing
    needs memory for the largest tensor, not two copies of the whole model. The model must stay
    under protobuf's 2 GiB limit; see :func:`save_with_external_data` for larger ones.
    """
    head, graph = _model_and_graph_without_tensors(model)
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    sizes = [len(_initializer(v)) for v in values]  # one tensor at a time, dropped at once
    graph_length = len(graph) + sum(len(field_header(INITIALIZER_FIELD, n)) + n for n in sizes)
    fh.write(head)
    fh.write(field_header(GRAPH_FIELD, graph_length))
    fh.write(graph)
    for value, size in zip(values, sizes):
        piece = _initializer(value)
        if len(piece) != size:
            raise ValueError(f"initializer {value.name!r} changed size while the model was written")
        fh.write(field_header(INITIALIZER_FIELD, size))
        fh.write(piece)


def save_with_external_data(model: ir.Model, path: str | os.PathLike[str], location: str) -> None:
    """Write ``model`` to ``path`` with its initializers of 1 KiB or more in the file ``location``
    (relative to ``path``'s folder); each tensor is streamed to that file by ONNX IR. Tensors in
    node attributes stay in ``path``: torch's exporter lifts constants to initializers."""
    ir.save(model, path, external_data=location, size_threshold_bytes=1024)


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
