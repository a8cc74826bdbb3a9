"""Varints both ways and field headers, checked against protobuf's own encoding."""

from __future__ import annotations

import io

import onnx
import pytest

from bnfold.protobuf_wire import GRAPH_FIELD, encode_varint, field_header, read_varint


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**32 + 10, 2**63, 2**64 - 1])
def test_varints_round_trip(value):
    encoded = encode_varint(value)
    assert read_varint(io.BytesIO(encoded)) == value
    assert len(encoded) == max(1, -(-value.bit_length() // 7))


def test_a_field_header_is_what_protobuf_writes():
    model = onnx.ModelProto()
    model.graph.name = "g" * 200  # a graph message over 127 bytes: a two-byte length
    graph = model.graph.SerializeToString()
    assert model.SerializeToString() == field_header(GRAPH_FIELD, len(graph)) + graph


@pytest.mark.parametrize("data", [b"", b"\x80", b"\xff" * 10 + b"\x01"], ids=["empty", "truncated", "over 64 bits"])
def test_bad_varints_are_a_value_error(data):
    with pytest.raises(ValueError):
        read_varint(io.BytesIO(data))
