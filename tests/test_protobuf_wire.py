"""Varints and field headers, checked against protobuf's own encoding."""

from __future__ import annotations

import onnx
import pytest

from bnfold.protobuf_wire import GRAPH_FIELD, encode_varint, field_header

IR_VERSION_TAG = b"\x08"  # ModelProto field 1 (ir_version, int64), wire type 0 (varint)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**32 + 10, 2**62, 2**63 - 1])
def test_a_varint_is_what_protobuf_writes(value):
    assert onnx.ModelProto(ir_version=value).SerializeToString() == IR_VERSION_TAG + encode_varint(value)


def test_a_field_header_is_what_protobuf_writes():
    model = onnx.ModelProto()
    model.graph.name = "g" * 200  # a graph message over 127 bytes: a two-byte length
    graph = model.graph.SerializeToString()
    assert model.SerializeToString() == field_header(GRAPH_FIELD, len(graph)) + graph
